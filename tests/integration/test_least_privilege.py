"""The worker's own login (a member of `minichat_runtime`, migration 0007) runs the usual traffic
and the read API, and can do nothing else: no roles, no grants to itself, no `COPY ... TO
PROGRAM`, no DDL, and it owns nothing. `db migrate`, `db grant-reader` and `db revoke-reader` use
the admin login (`MINICHAT_ADMIN_DATABASE_URL`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from minichat.bench.workers import free_port
from minichat.processors.tokens import add_token
from tests.conftest import Deployment, deployment_settings, live_deployment
from tests.support import Endpoints, as_runtime, run_cli, use_runtime_login, wait_until

pytestmark = pytest.mark.integration

RUNTIME = "minichat_runtime"
TABLE_GRANTS = {
    "chats": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "chat_turns": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "messages": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "quota_usage": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "quota_alerts": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "turn_decisions": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "outbox": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "order_log": {"SELECT", "INSERT", "DELETE"},  # rows leave once relayed (0008)
    "parked_events": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "consumer_positions": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "policy_versions": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "schema_migrations": {"SELECT"},
    "reader_tenants": set(),  # operator data: the function reads it as the owner
}
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@pytest.fixture(scope="module")
def runtime_user(endpoints: Endpoints) -> Iterator[str]:
    """The runtime login's name. The stack has one (`scripts/stack.sh`); otherwise (one login for
    everything) this module makes one, so the test runs in every setting."""
    if endpoints.runtime_url:
        yield urlsplit(endpoints.runtime_url).username or ""
        return
    import asyncio

    name, password = f"minichat_rt_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    async def run(*statements: str) -> None:
        con = await asyncpg.connect(endpoints.database_url)
        try:
            for statement in statements:
                await con.execute(statement)
        finally:
            await con.close()

    asyncio.run(run(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' INHERIT", f"GRANT {RUNTIME} TO {name}"))
    parts = urlsplit(endpoints.database_url)
    use_runtime_login(parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port}").geturl())
    try:
        yield name
    finally:
        use_runtime_login(None)
        asyncio.run(run(f"DROP ROLE {name}"))


@pytest.fixture
async def runtime(database_url: str, runtime_user: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the runtime login to a migrated database."""
    url = as_runtime(database_url)
    assert urlsplit(url).username == runtime_user
    con = await asyncpg.connect(url)
    try:
        yield con
    finally:
        await con.close()


async def test_the_runtime_login_decides_settles_publishes_and_serves_reads(
    endpoints: Endpoints, template_database: str, tmp_path: Path, runtime_user: str
) -> None:
    tenant, user = uuid.uuid4(), uuid.uuid4()
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, tenant)
    port = free_port()
    env = {
        "MINICHAT_WEB_ENABLED": "true",
        "MINICHAT_WEB_PORT": str(port),
        "MINICHAT_READ_TOKENS_FILE": str(tokens),
    }
    async with live_deployment(endpoints, template_database, tmp_path, env=env) as live:
        gateway = live.gateway
        chats = [uuid.uuid4() for _ in range(3)]
        commands = [
            gateway.requested(tenant, user, chat, content=f"question {i}") for i, chat in enumerate(chats)
        ]
        decisions = await gateway.decide(*commands, timeout=90)
        assert [d["decision"] for d in decisions] == ["allow"] * 3
        usage = {"input_tokens": 12, "output_tokens": 8}
        await gateway.send_provider(
            *(gateway.provider("turn.completed", c, content="answer", usage=usage) for c in commands)
        )

        async def settled_and_published() -> bool:
            settled = await live.db.fetchval(
                "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND settled_at IS NOT NULL", tenant
            )
            unpublished = await live.db.fetchval(
                "SELECT count(*) FROM outbox WHERE tenant_id = $1 AND published_at IS NULL", tenant
            )
            published = await live.db.fetchval(
                "SELECT count(*) FROM outbox WHERE tenant_id = $1 AND published_at IS NOT NULL", tenant
            )
            return bool(settled == 3 and unpublished == 0 and published > 0)

        await wait_until(settled_and_published, timeout=90, what="3 turns settled, their billing published")
        # the read API reads as minichat_reader on the runtime login's connections
        async with aiohttp.ClientSession() as http:

            async def read() -> str | None:
                try:
                    async with http.get(
                        f"http://127.0.0.1:{port}/v1/chats/{chats[0]}/messages",
                        headers={"Authorization": f"Bearer {token}"},
                    ) as response:
                        return await response.text() if response.status == 200 else None
                except aiohttp.ClientError:
                    return None

            body = await wait_until(read, timeout=60, what="a messages page")
        assert "question 0" in body and "answer" in body
        # every connection the worker made to its database is the runtime login's
        name = urlsplit(live.settings.database_url).path.lstrip("/")
        users = await live.db.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
            " AND usename <> current_user",
            name,
        )
        assert [r["usename"] for r in users] == [runtime_user]


async def memberships(con: asyncpg.Connection, role: str) -> set[str]:
    """Every role `role` is a member of, directly or not."""
    rows = await con.fetch(
        "SELECT rolname FROM pg_roles WHERE pg_has_role($1::name, oid, 'MEMBER') AND rolname <> $1", role
    )
    return {r["rolname"] for r in rows}


async def test_the_runtime_login_cannot_escalate(runtime: asyncpg.Connection, database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        owner = await admin.fetchval("SELECT current_user")
    finally:
        await admin.close()
    me = await runtime.fetchval("SELECT session_user")
    assert await memberships(runtime, me) == {RUNTIME, "minichat_reader"}
    for statement in (
        "CREATE ROLE minichat_escalated LOGIN",
        f"ALTER ROLE {me} CREATEROLE",
        f"GRANT pg_execute_server_program TO {me}",
        f"GRANT pg_read_server_files TO {me}",
        f"GRANT {owner} TO {me}",
        f"GRANT minichat_reader TO {me} WITH ADMIN OPTION",
        f"GRANT {RUNTIME} TO {me} WITH ADMIN OPTION",
        f"SET ROLE {owner}",
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "COPY messages FROM PROGRAM 'id'",
        "CREATE DATABASE minichat_escalated",
        "CREATE TABLE public.minichat_escalated (a int)",
        "CREATE FUNCTION public.minichat_escalated() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER TABLE chats ADD COLUMN escalated int",
        "ALTER TABLE chats DISABLE ROW LEVEL SECURITY",
        "DROP POLICY runtime_all ON chats",
        "DROP TABLE messages",
        "TRUNCATE messages",
        "GRANT SELECT ON reader_tenants TO PUBLIC",
        "SELECT * FROM reader_tenants",
        "INSERT INTO reader_tenants (role_name, tenant_id) VALUES (session_user, gen_random_uuid())",
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (99, 'x', 'x')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute(statement)
    assert await memberships(runtime, me) == {RUNTIME, "minichat_reader"}
    assert not await runtime.fetchval("SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = $1", me)


async def test_the_runtime_role_owns_nothing_and_holds_only_its_grants(
    runtime: asyncpg.Connection, runtime_user: str
) -> None:
    for role in (RUNTIME, runtime_user):
        flags = await runtime.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication FROM pg_roles"
            " WHERE rolname = $1",
            role,
        )
        assert flags is not None and not any(flags.values()), (role, dict(flags or {}))
        # owner dependencies of every database of the cluster (pg_shdepend is shared)
        owned = await runtime.fetchval(
            "SELECT count(*) FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid"
            " WHERE d.deptype = 'o' AND r.rolname = $1",
            role,
        )
        assert owned == 0, role
        for catalog, column in (
            ("pg_class", "relowner"),
            ("pg_namespace", "nspowner"),
            ("pg_proc", "proowner"),
        ):
            count = await runtime.fetchval(
                f"SELECT count(*) FROM {catalog} x JOIN pg_roles r ON r.oid = x.{column}"
                " WHERE r.rolname = $1",
                role,
            )
            assert count == 0, (role, catalog)
        assert not await runtime.fetchval(
            "SELECT count(*) FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE r.rolname = $1",
            role,
        )
    # member of the runtime role (and through it the reader role), of nothing else
    assert await memberships(runtime, runtime_user) == {RUNTIME, "minichat_reader"}
    tables = {
        r["relname"]
        for r in await runtime.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname = current_schema()"
        )
    }
    assert tables == set(TABLE_GRANTS), "a new table: decide the runtime role's grants on it (0007)"
    for table, granted in TABLE_GRANTS.items():
        held = {
            p for p in PRIVILEGES if await runtime.fetchval("SELECT has_table_privilege($1, $2)", table, p)
        }
        assert held == granted, table
    assert await runtime.fetchval("SELECT has_sequence_privilege('outbox_id_seq', 'USAGE')")
    assert await runtime.fetchval("SELECT has_sequence_privilege('order_log_id_seq', 'USAGE')")
    assert not await runtime.fetchval("SELECT has_schema_privilege(current_schema(), 'CREATE')")


async def test_db_commands_use_the_admin_login_and_refuse_to_bind_a_runtime_login(
    endpoints: Endpoints, empty_database_url: str, runtime_user: str
) -> None:
    settings = deployment_settings(endpoints, empty_database_url)
    env = Deployment(settings).env()
    assert urlsplit(env["MINICHAT_DATABASE_URL"]).username == runtime_user
    # the runtime login alone cannot create the schema ...
    alone = run_cli({**env, "MINICHAT_ADMIN_DATABASE_URL": env["MINICHAT_DATABASE_URL"]}, "db", "migrate")
    assert alone.returncode != 0
    # ... the admin login does, while the worker's login stays the runtime one
    migrated = run_cli(env, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "0007_tenant_boundary" in migrated.stdout
    refused = run_cli(env, "db", "grant-reader", "--tenant", str(uuid.uuid4()), "--role", runtime_user)
    assert refused.returncode == 2 and f"member of {RUNTIME}" in refused.stderr, refused.stderr
    # grant-reader and revoke-reader write `reader_tenants`, which the runtime login cannot: they
    # succeed on the admin login
    con = await asyncpg.connect(empty_database_url)
    reader, tenant = f"minichat_lp_{uuid.uuid4().hex[:8]}", uuid.uuid4()
    await con.execute(f"CREATE ROLE {reader} LOGIN PASSWORD '{uuid.uuid4().hex}'")
    try:
        assert await con.fetchval("SELECT count(*) FROM reader_tenants") == 0
        granted = run_cli(env, "db", "grant-reader", "--tenant", str(tenant), "--role", reader)
        assert granted.returncode == 0, granted.stderr
        assert (
            await con.fetchval("SELECT tenant_id FROM reader_tenants WHERE role_name = $1", reader) == tenant
        )
        revoked = run_cli(env, "db", "revoke-reader", "--role", reader)
        assert revoked.returncode == 0, revoked.stderr
        assert await con.fetchval("SELECT count(*) FROM reader_tenants") == 0
    finally:
        await con.execute("DELETE FROM reader_tenants WHERE role_name = $1", reader)
        await con.execute(f"DROP ROLE {reader}")
        await con.close()
