-- minichat schema v5: a reader login is bound to one tenant, and the session cannot change it.
--
-- Until v4 the reader's tenant was the setting `minichat.tenant_id`, which any session may set:
-- a reader login could `set_config('minichat.tenant_id', '<another tenant>', false)` and read that
-- tenant's rows. Now the row policies ask `minichat_reader_tenant()`:
--
--   * a login listed in `reader_tenants` (`minichat db grant-reader --tenant T --role R`) sees
--     tenant T, whatever it sets: the binding is keyed on `session_user`, which SET ROLE does not
--     change and only a superuser could;
--   * the tables' owner (the worker, and the read API on the worker's pool, after
--     `SET LOCAL ROLE minichat_reader`) names the tenant with the transaction-local setting: the
--     owner can read every row anyway, so the setting gives it nothing new;
--   * any other session sees nothing.
--
-- `reader_tenants` is operator data: the reader role has no grant on it (the function reads it
-- with its owner's rights).

CREATE TABLE reader_tenants (
    role_name   name         PRIMARY KEY,
    tenant_id   uuid         NOT NULL,
    granted_at  timestamptz  NOT NULL DEFAULT now()  -- processing clock, for operators
);

-- SECURITY DEFINER runs as the owner: the search path is pinned to this schema (and pg_catalog
-- first), so a session cannot slip its own objects in.
DO $$
BEGIN
    EXECUTE format($f$
        CREATE FUNCTION minichat_reader_tenant() RETURNS uuid
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, %1$I
        AS $body$
            SELECT CASE
                WHEN EXISTS (SELECT FROM reader_tenants WHERE role_name = session_user)
                    THEN (SELECT tenant_id FROM reader_tenants WHERE role_name = session_user)
                WHEN session_user = (SELECT pg_get_userbyid(relowner) FROM pg_class
                                     WHERE oid = %2$L::regclass)
                    THEN nullif(current_setting('minichat.tenant_id', true), '')::uuid
            END
        $body$
    $f$, current_schema(), format('%I.chats', current_schema()));
END
$$;

REVOKE ALL ON FUNCTION minichat_reader_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION minichat_reader_tenant() TO minichat_reader;

ALTER POLICY tenant_read ON chats USING (tenant_id = minichat_reader_tenant());
ALTER POLICY tenant_read ON chat_turns USING (tenant_id = minichat_reader_tenant());
ALTER POLICY tenant_read ON messages USING (tenant_id = minichat_reader_tenant());
ALTER POLICY tenant_read ON quota_usage USING (tenant_id = minichat_reader_tenant());
ALTER POLICY tenant_read ON turn_decisions USING (tenant_id = minichat_reader_tenant());
ALTER POLICY tenant_read ON outbox USING (tenant_id = minichat_reader_tenant());
ALTER POLICY tenant_read ON parked_events USING (tenant_id = minichat_reader_tenant());
