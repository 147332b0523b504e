-- minichat's runtime login, for a development or test cluster (scripts/stack.sh up runs it on
-- every start; docker-compose.yml runs it once, when the data volume is created). Run it as a
-- superuser: it is idempotent. Production: docs/operations.md, "PostgreSQL roles and logins".
--
-- `minichat_runtime` (NOLOGIN) receives its table grants from `minichat db migrate` (migration
-- 0007); `minichat_worker` is the worker's own login (MINICHAT_DATABASE_URL): a member of it and
-- nothing else, so it owns nothing and cannot create roles or databases. The schema's owner (the
-- admin login, MINICHAT_ADMIN_DATABASE_URL) is created by the caller.
SET client_min_messages = warning;  -- "already a member" on every start is not news
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'minichat_runtime') THEN
        CREATE ROLE minichat_runtime NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
            NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'minichat_worker') THEN
        CREATE ROLE minichat_worker LOGIN PASSWORD 'minichat_worker' NOSUPERUSER NOCREATEDB
            NOCREATEROLE INHERIT NOREPLICATION NOBYPASSRLS;
    ELSE
        ALTER ROLE minichat_worker LOGIN PASSWORD 'minichat_worker' NOSUPERUSER NOCREATEDB
            NOCREATEROLE INHERIT NOREPLICATION NOBYPASSRLS;
    END IF;
END
$$;
GRANT minichat_runtime TO minichat_worker;
