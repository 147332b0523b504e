-- minichat schema v7: a reader's own objects cannot move the tenant boundary, and the worker's
-- login owns nothing (docs/security.md §6).
--
-- 1. `minichat_reader_tenant()` runs as the tables' owner (SECURITY DEFINER). PostgreSQL searches
--    the session's temporary schema FIRST for relations and types unless the search path names
--    it, and every login may create temporary tables: a reader's temporary `reader_tenants`,
--    `pg_class` or view shadowed the real ones and chose its tenant (or ran its code as the owner).
--    Now the path ends in `pg_temp` and every relation, type, function and operator is named with
--    its schema (NULLIF's text `=` is pg_catalog's: first in the path), so nothing a session
--    creates is ever read.
-- 2. Readers (and any other role without an explicit grant) may no longer create temporary
--    objects, nor objects in this schema, where the migrating role may revoke that.
-- 3. `minichat_runtime` (NOLOGIN) holds exactly what the worker, `replay` and the read API need:
--    DML on the tables, no ownership, no CREATEROLE. Row-level security applies to it (it owns
--    nothing), so each tenant table gets a policy that shows it every row. It is a member of
--    `minichat_reader`, so a runtime login may `SET LOCAL ROLE minichat_reader` for the read API,
--    and the owner path of `minichat_reader_tenant()` (the tenant named by the transaction-local
--    setting) holds for its logins as for the owner: they read every row anyway.
--
-- Roles are cluster-wide, so they are created only when missing (as in 0002). Creating the role
-- and granting `minichat_reader` to it need CREATEROLE (or an administrator doing it beforehand).

DO $$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION %1$I.minichat_reader_tenant() RETURNS pg_catalog.uuid
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
            SELECT CASE
                WHEN EXISTS (SELECT FROM %1$I.reader_tenants b
                             WHERE b.role_name OPERATOR(pg_catalog.=) session_user)
                    THEN (SELECT b.tenant_id FROM %1$I.reader_tenants b
                          WHERE b.role_name OPERATOR(pg_catalog.=) session_user)
                WHEN session_user OPERATOR(pg_catalog.=)
                         (SELECT pg_catalog.pg_get_userbyid(c.relowner) FROM pg_catalog.pg_class c
                          WHERE c.oid OPERATOR(pg_catalog.=) %2$L::pg_catalog.regclass::pg_catalog.oid)
                  OR pg_catalog.pg_has_role(session_user, 'minichat_runtime', 'MEMBER')
                    THEN NULLIF(pg_catalog.current_setting('minichat.tenant_id', true),
                                '')::pg_catalog.uuid
            END
        $body$
    $f$, current_schema(), format('%I.chats', current_schema()));
END
$$;

-- Temporary objects and objects in this schema: none for PUBLIC (the owner keeps its own rights;
-- the runtime role gets TEMPORARY back below, for `replay`'s temporary table). A database or
-- schema the migrating role does not own keeps its grants: the function above holds without this.
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, minichat_reader', current_database());
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'minichat: cannot revoke TEMPORARY on this database (not its owner); an administrator should';
END
$$;

DO $$
BEGIN
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC, minichat_reader', current_schema());
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'minichat: cannot revoke CREATE on this schema (not its owner); an administrator should';
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'minichat_runtime') THEN
        BEGIN
            CREATE ROLE minichat_runtime NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
                NOREPLICATION NOBYPASSRLS;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it a moment ago
        END;
    END IF;
    -- NOINHERIT: the runtime role's logins may SET ROLE minichat_reader, but do not carry its
    -- row policies into their own queries.
    IF NOT pg_catalog.pg_has_role('minichat_runtime', 'minichat_reader', 'MEMBER') THEN
        GRANT minichat_reader TO minichat_runtime;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO minichat_runtime, minichat_reader', current_schema());
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO minichat_runtime', current_database());
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'minichat: cannot grant TEMPORARY on this database to minichat_runtime; an administrator should';
END
$$;

-- What the worker writes and reads. `reader_tenants` is operator data the runtime never touches
-- (the function reads it as the owner); the ledger is read at start-up to refuse an old schema.
GRANT SELECT, INSERT, UPDATE, DELETE
    ON chats, chat_turns, messages, quota_usage, turn_decisions, outbox, parked_events,
       consumer_positions, policy_versions
    TO minichat_runtime;
GRANT SELECT ON schema_migrations TO minichat_runtime;
GRANT USAGE, SELECT ON SEQUENCE outbox_id_seq TO minichat_runtime;

CREATE POLICY runtime_all ON chats TO minichat_runtime USING (true) WITH CHECK (true);
CREATE POLICY runtime_all ON chat_turns TO minichat_runtime USING (true) WITH CHECK (true);
CREATE POLICY runtime_all ON messages TO minichat_runtime USING (true) WITH CHECK (true);
CREATE POLICY runtime_all ON quota_usage TO minichat_runtime USING (true) WITH CHECK (true);
CREATE POLICY runtime_all ON turn_decisions TO minichat_runtime USING (true) WITH CHECK (true);
CREATE POLICY runtime_all ON outbox TO minichat_runtime USING (true) WITH CHECK (true);
CREATE POLICY runtime_all ON parked_events TO minichat_runtime USING (true) WITH CHECK (true);
