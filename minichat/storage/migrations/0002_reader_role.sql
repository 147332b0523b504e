-- minichat schema v2: a read-only role for the read API, scoped to one tenant by row-level security.
--
-- `minichat_reader` (NOLOGIN) may SELECT the tenant tables and nothing else. Every row it can see
-- belongs to the tenant named by the transaction-local setting `minichat.tenant_id`:
--
--     BEGIN;
--     SET LOCAL ROLE minichat_reader;                             -- or log in as a member of it
--     SELECT set_config('minichat.tenant_id', $1, true);          -- = SET LOCAL minichat.tenant_id
--     SELECT ... ;                                                -- sees tenant $1's rows only
--     COMMIT;                                                     -- the setting ends here
--
-- Without the setting (or with it empty) the reader sees no rows at all; a value that is not a
-- UUID is an error. The worker is the tables' owner and owners bypass row-level security (no
-- FORCE), so nothing here changes what the worker reads or writes. docs/security.md has the why.
--
-- Roles are cluster-wide while this migration runs once per database (several databases of one
-- cluster share the role), so the role is created only when missing, and a concurrent creation by
-- another database's migration is tolerated. The migrating role needs CREATEROLE for that (or the
-- role created beforehand by an administrator) and must own the tables (it created them in 0001).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'minichat_reader') THEN
        BEGIN
            CREATE ROLE minichat_reader NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
                NOREPLICATION NOBYPASSRLS;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it a moment ago
        END;
    END IF;
END
$$;

-- The owner (the migrating role) may `SET ROLE minichat_reader`: that is how the read API and the
-- tests become the reader on the worker's own connections. Membership gives the owner nothing it
-- does not already have (SELECT on its own tables). Re-granting is a no-op.
DO $$
BEGIN
    EXECUTE format('GRANT minichat_reader TO %I', current_user);
END
$$;

GRANT SELECT ON chats, chat_turns, messages, quota_usage, turn_decisions, outbox, parked_events
    TO minichat_reader;

ALTER TABLE chats ENABLE ROW LEVEL SECURITY;
ALTER TABLE chat_turns ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE turn_decisions ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE parked_events ENABLE ROW LEVEL SECURITY;

-- One permissive SELECT policy per table, for the reader only. Any other non-owner role has no
-- policy and therefore sees nothing (row-level security denies by default).
CREATE POLICY tenant_read ON chats FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
CREATE POLICY tenant_read ON chat_turns FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
CREATE POLICY tenant_read ON messages FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
CREATE POLICY tenant_read ON quota_usage FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
CREATE POLICY tenant_read ON turn_decisions FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
CREATE POLICY tenant_read ON outbox FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
CREATE POLICY tenant_read ON parked_events FOR SELECT TO minichat_reader
    USING (tenant_id = nullif(current_setting('minichat.tenant_id', true), '')::uuid);
