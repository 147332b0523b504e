"""Tenant isolation in the database (migration 0002) and what the worker writes to its log.

The read API reads as `minichat_reader`, one tenant per transaction:
`SET LOCAL ROLE minichat_reader` (or a login that is a member of it) and
`set_config('minichat.tenant_id', <tenant>, true)`. Row-level security then shows that tenant's
rows and nothing else; without the setting nothing at all. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from minichat.models.topics import TopicNames
from tests.conftest import live_deployment
from tests.gateway import Gateway
from tests.support import (
    Endpoints,
    TopicReader,
    produce,
    run_worker,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration

READER = "minichat_reader"
TENANT_TABLES = (
    "chats",
    "chat_turns",
    "messages",
    "quota_usage",
    "turn_decisions",
    "outbox",
    "parked_events",
    "quota_alerts",
)
SYSTEM_TABLES = ("schema_migrations", "policy_versions")
AT = datetime(2026, 3, 1, 12, tzinfo=UTC)


async def seed_tenant(con: asyncpg.Connection, tenant: uuid.UUID, n: int) -> None:
    """`n` rows of `tenant` in every tenant table, written as the owner (the worker's role)."""
    for _ in range(n):
        user, chat, request = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await con.execute(
            "INSERT INTO chats (id, tenant_id, user_id, model, created_at, updated_at)"
            " VALUES ($1, $2, $3, 'gpt-5-mini', $4, $4)",
            chat,
            tenant,
            user,
            AT,
        )
        await con.execute(
            """
            INSERT INTO chat_turns (id, tenant_id, chat_id, request_id, requester_type, requester_user_id,
                state, selected_model, effective_model, reserve_tokens, max_output_tokens_applied,
                reserved_credits_micro, policy_version_applied, minimal_generation_floor_applied,
                period_daily, period_monthly, started_at, updated_at)
            VALUES ($1, $2, $3, $4, 'user', $5, 'running', 'gpt-5-mini', 'gpt-5-mini', 10, 5, 1, 1, 1,
                    $6, $7, $8, $8)
            """,
            uuid.uuid4(),
            tenant,
            chat,
            request,
            user,
            date(2026, 3, 1),
            date(2026, 3, 1),
            AT,
        )
        await con.execute(
            "INSERT INTO messages (id, tenant_id, chat_id, request_id, role, content, created_at)"
            " VALUES ($1, $2, $3, $4, 'user', $5, $6)",
            uuid.uuid4(),
            tenant,
            chat,
            request,
            f"secret of {tenant}",
            AT,
        )
        await con.execute(
            "INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket, updated_at)"
            " VALUES ($1, $2, $3, 'daily', '2026-03-01', 'total', $4)",
            uuid.uuid4(),
            tenant,
            user,
            AT,
        )
        await con.execute(
            "INSERT INTO quota_alerts (tenant_id, user_id, bucket, period_type, period_start,"
            " threshold_percent, event_id, limit_credits_micro, spent_credits_micro, request_id, occurred_at)"
            " VALUES ($1, $2, 'total', 'daily', '2026-03-01', 50, $3, 100, 50, $4, $5)",
            tenant,
            user,
            uuid.uuid4(),
            request,
            AT,
        )
        await con.execute(
            "INSERT INTO turn_decisions (tenant_id, chat_id, command_id, command, command_event_id,"
            " request_id, decision, payload, decided_at)"
            " VALUES ($1, $2, $3, 'turn.requested', $4, $3, 'allow', '{}'::jsonb, $5)",
            tenant,
            chat,
            request,
            uuid.uuid4(),
            AT,
        )
        await con.execute(
            "INSERT INTO outbox (tenant_id, dedupe_key, event_type, payload, created_at)"
            " VALUES ($1, $2, 'usage.settled', '{}'::jsonb, $3)",
            tenant,
            f"{tenant.hex}/{uuid.uuid4().hex}/{request.hex}",
            AT,
        )
        await con.execute(
            "INSERT INTO parked_events (tenant_id, chat_id, request_id, source_topic, source_partition,"
            " source_offset, event_type, payload, record_timestamp)"
            " VALUES ($1, $2, $3, 'usage', 0, $4, 'usage.reported', '\\x7b7d'::bytea, $5)",
            tenant,
            chat,
            request,
            # offsets unique across the tenants seeded into one database
            uuid.uuid4().int % 2**62,
            AT,
        )


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the migrating role, which owns the tables (the worker connects as it)."""
    con = await asyncpg.connect(database_url)
    try:
        yield con
    finally:
        await con.close()


@pytest.fixture
async def tenants(owner: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    a, b = uuid.uuid4(), uuid.uuid4()
    await seed_tenant(owner, a, 2)
    await seed_tenant(owner, b, 3)
    return a, b


@asynccontextmanager
async def as_reader(con: asyncpg.Connection, tenant: uuid.UUID | str | None) -> AsyncIterator[None]:
    """One read-API transaction: the reader role and (unless None) the tenant, both LOCAL."""
    async with con.transaction():
        await con.execute(f"SET LOCAL ROLE {READER}")
        if tenant is not None:
            await con.execute("SELECT set_config('minichat.tenant_id', $1, true)", str(tenant))
        yield


async def visible(con: asyncpg.Connection) -> dict[str, list[uuid.UUID]]:
    """Per tenant table, the tenant_id of every row the current role can see."""
    return {
        table: [r["tenant_id"] for r in await con.fetch(f"SELECT tenant_id FROM {table}")]
        for table in TENANT_TABLES
    }


# ------------------------------------------------------------------------------ the role itself


async def test_reader_role_is_read_only_and_cannot_log_in(owner: asyncpg.Connection) -> None:
    role = await owner.fetchrow(
        "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles"
        " WHERE rolname = $1",
        READER,
    )
    assert role is not None, "migration 0002 creates the role"
    assert dict(role) == {
        "rolcanlogin": False,
        "rolsuper": False,
        "rolbypassrls": False,
        "rolcreaterole": False,
        "rolcreatedb": False,
    }
    for table in TENANT_TABLES:
        for privilege, granted in (
            ("SELECT", True),
            ("INSERT", False),
            ("UPDATE", False),
            ("DELETE", False),
            ("TRUNCATE", False),
            ("REFERENCES", False),
            ("TRIGGER", False),
        ):
            has = await owner.fetchval("SELECT has_table_privilege($1, $2, $3)", READER, table, privilege)
            assert has is granted, (table, privilege)
    for table in SYSTEM_TABLES:
        assert not await owner.fetchval("SELECT has_table_privilege($1, $2, 'SELECT')", READER, table)
    # no sequence either: the reader cannot consume outbox ids
    assert not await owner.fetchval(
        "SELECT has_sequence_privilege($1, 'outbox_id_seq', 'USAGE,SELECT,UPDATE')", READER
    )


async def test_row_level_security_is_on_with_one_select_policy_per_table(owner: asyncpg.Connection) -> None:
    flags = await owner.fetch(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class"
        " WHERE relname = ANY($1::text[]) AND relkind = 'r'",
        list(TENANT_TABLES),
    )
    # enabled, not forced: the owner (the worker) is not subject to it
    assert {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in flags} == {
        t: (True, False) for t in TENANT_TABLES
    }
    policies = await owner.fetch(
        "SELECT tablename, policyname, permissive, roles::text[] AS roles, cmd, qual FROM pg_policies"
        " WHERE schemaname = 'public' AND policyname = 'tenant_read' ORDER BY tablename"
    )
    # the runtime role's own policy (every row: the worker's login) is the only other one
    others = await owner.fetch(
        "SELECT tablename, roles::text[] AS roles, cmd, qual, with_check FROM pg_policies"
        " WHERE schemaname = 'public' AND policyname <> 'tenant_read'"
    )
    assert {(p["tablename"], tuple(p["roles"]), p["cmd"], p["qual"], p["with_check"]) for p in others} == {
        (t, ("minichat_runtime",), "ALL", "true", "true") for t in TENANT_TABLES
    }
    assert sorted(p["tablename"] for p in policies) == sorted(TENANT_TABLES)
    for p in policies:
        assert (p["permissive"], p["roles"], p["cmd"]) == ("PERMISSIVE", [READER], "SELECT"), dict(p)
        assert p["qual"] == "(tenant_id = minichat_reader_tenant())", p["qual"]
    # the table owner is the role the worker connects as
    owners = await owner.fetch(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename = ANY($1::text[])", list(TENANT_TABLES)
    )
    assert [r["tableowner"] for r in owners] == [await owner.fetchval("SELECT current_user")]


# ------------------------------------------------------------------------------ what it sees


async def test_without_the_setting_the_reader_sees_nothing(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    async with as_reader(owner, None):
        assert await owner.fetchval("SELECT current_user") == READER
        assert await visible(owner) == {t: [] for t in TENANT_TABLES}
    async with as_reader(owner, ""):  # an empty setting is the same as none
        assert await visible(owner) == {t: [] for t in TENANT_TABLES}
    async with as_reader(owner, uuid.uuid4()):  # a tenant with no data
        assert await visible(owner) == {t: [] for t in TENANT_TABLES}


async def test_the_setting_shows_one_tenant_and_none_of_the_other(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = tenants
    for tenant, rows in ((a, 2), (b, 3)):
        async with as_reader(owner, tenant):
            assert await visible(owner) == {t: [tenant] * rows for t in TENANT_TABLES}
    # Knowing another tenant's ids does not help: B's chat is invisible to A, even by primary key.
    b_chat = await owner.fetchval("SELECT id FROM chats WHERE tenant_id = $1 LIMIT 1", b)
    async with as_reader(owner, a):
        assert await owner.fetchval("SELECT count(*) FROM chats WHERE id = $1", b_chat) == 0
        assert await owner.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", b_chat) == 0
        assert await owner.fetchval("SELECT count(*) FROM messages WHERE content LIKE '%' || $1", str(b)) == 0
        # nor does asking for both tenants explicitly
        assert await owner.fetchval(
            "SELECT count(*) FROM chat_turns WHERE tenant_id = ANY($1::uuid[])", [a, b]
        ) == 2  # fmt: skip


async def test_the_reader_cannot_write(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = tenants
    attempts = [f"DELETE FROM {t}" for t in TENANT_TABLES]
    attempts += [f"UPDATE {t} SET tenant_id = tenant_id" for t in TENANT_TABLES]
    attempts += [f"TRUNCATE {t} CASCADE" for t in TENANT_TABLES]
    attempts += [
        "INSERT INTO chats (id, tenant_id, user_id, model, created_at, updated_at)"
        f" VALUES (gen_random_uuid(), '{a}', gen_random_uuid(), 'm', now(), now())",
        "INSERT INTO outbox (tenant_id, dedupe_key, event_type, payload, created_at)"
        f" VALUES ('{a}', 'forged', 'usage.settled', '{{}}', now())",
        "INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket, updated_at)"
        f" VALUES (gen_random_uuid(), '{a}', gen_random_uuid(), 'daily', '2026-03-01', 'total', now())",
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (99, 'x', 'x')",
        "SELECT * FROM policy_versions",
        "SELECT * FROM schema_migrations",
    ]
    before = {t: await owner.fetchval(f"SELECT count(*) FROM {t}") for t in TENANT_TABLES}
    for statement in attempts:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with as_reader(owner, a):
                await owner.execute(statement)
    assert {t: await owner.fetchval(f"SELECT count(*) FROM {t}") for t in TENANT_TABLES} == before


async def test_the_reader_cannot_widen_its_own_view(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = tenants
    for statement in (
        "ALTER TABLE chats DISABLE ROW LEVEL SECURITY",
        "DROP POLICY tenant_read ON chats",
        "CREATE POLICY everything ON chats FOR SELECT TO minichat_reader USING (true)",
        "GRANT SELECT ON policy_versions TO minichat_reader",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"must be owner|permission denied"):
            async with as_reader(owner, a):
                await owner.execute(statement)
    # `row_security = off` may be set, but then a query that RLS would filter fails instead of
    # showing every row
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_reader(owner, a):
            await owner.execute("SET LOCAL row_security = off")
            await owner.fetch("SELECT * FROM chats")


async def test_an_invalid_tenant_setting_fails_closed(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    with pytest.raises(asyncpg.InvalidTextRepresentationError):
        async with as_reader(owner, "' OR true --"):
            await owner.fetch("SELECT * FROM chats")


async def test_the_setting_and_the_role_end_with_the_transaction(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = tenants
    async with as_reader(owner, a):
        assert set((await visible(owner))["chats"]) == {a}
    # Same connection, next transaction: no tenant any more (SET LOCAL ended with the commit) ...
    async with as_reader(owner, None):
        assert await visible(owner) == {t: [] for t in TENANT_TABLES}
    # ... and the `SET LOCAL` statement form behaves the same
    async with owner.transaction():
        await owner.execute(f"SET LOCAL ROLE {READER}")
        await owner.execute(f"SET LOCAL minichat.tenant_id = '{b}'")
        assert set((await visible(owner))["messages"]) == {b}
    assert await owner.fetchval("SELECT current_setting('minichat.tenant_id', true)") in ("", None)
    # a rolled-back transaction leaks nothing either
    with pytest.raises(RuntimeError):
        async with as_reader(owner, a):
            raise RuntimeError("abort")
    assert await owner.fetchval("SELECT current_setting('minichat.tenant_id', true)") in ("", None)
    # the role was local too: the owner is itself again and sees every tenant, RLS or not
    assert await owner.fetchval("SELECT current_user") != READER
    for table in TENANT_TABLES:
        seen = {r["tenant_id"] for r in await owner.fetch(f"SELECT tenant_id FROM {table}")}
        assert seen == {a, b}, table


@asynccontextmanager
async def reader_login(
    owner: asyncpg.Connection, database_url: str
) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A new LOGIN role (not the owner, no grants yet) and a connection of it."""
    name = f"minichat_api_test_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    await owner.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' INHERIT")
    try:
        parts = urlsplit(database_url)
        login_url = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port}"))
        con = await asyncpg.connect(login_url)
        try:
            yield name, con
        finally:
            await con.close()
    finally:
        await owner.execute("DELETE FROM reader_tenants WHERE role_name = $1", name)
        await owner.execute(f"DROP ROLE {name}")


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = worker_env({"MINICHAT_DATABASE_URL": database_url})
    return subprocess.run(
        [sys.executable, "-m", "minichat.cli", "db", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_reader_login_is_bound_to_one_tenant_whatever_it_sets(
    owner: asyncpg.Connection, tenants: tuple[uuid.UUID, uuid.UUID], database_url: str
) -> None:
    """How people read the database directly (analysts, BI, a read API with its own login): a login
    bound to tenant A with `minichat db grant-reader` sees A's rows and none of B's, however it
    sets `minichat.tenant_id` (session-wide, local, or by SET). Until it is bound it sees nothing."""
    a, b = tenants
    async with reader_login(owner, database_url) as (name, login):
        await owner.execute(f"GRANT {READER} TO {name}")  # a member, but not bound: nothing
        await login.execute("SELECT set_config('minichat.tenant_id', $1, false)", str(b))
        assert await visible(login) == {t: [] for t in TENANT_TABLES}

        granted = _cli(database_url, "grant-reader", "--tenant", str(a), "--role", name)
        assert granted.returncode == 0, granted.stderr
        assert await visible(login) == {t: [a] * 2 for t in TENANT_TABLES}
        for widen in (
            "SELECT set_config('minichat.tenant_id', '{b}', false)",
            "SET minichat.tenant_id = '{b}'",
            "SET ROLE {reader}",
            "SELECT set_config('minichat.tenant_id', '', false)",
        ):
            await login.execute(widen.format(b=b, reader=READER))
            assert await visible(login) == {t: [a] * 2 for t in TENANT_TABLES}, widen
        async with login.transaction():
            await login.execute("SELECT set_config('minichat.tenant_id', $1, true)", str(b))
            assert await visible(login) == {t: [a] * 2 for t in TENANT_TABLES}
        await login.execute("RESET ALL; RESET ROLE")
        # what it cannot do either: write, read the bindings, become the owner, switch RLS off
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.execute(f"DELETE FROM chats WHERE tenant_id = '{a}'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.execute(f"UPDATE reader_tenants SET tenant_id = '{b}'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.fetch("SELECT * FROM reader_tenants")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.execute(f"SET ROLE {await owner.fetchval('SELECT current_user')}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.execute("SET row_security = off; SELECT * FROM messages")

        moved = _cli(database_url, "grant-reader", "--tenant", str(b), "--role", name)
        assert moved.returncode == 0, moved.stderr
        assert await visible(login) == {t: [b] * 3 for t in TENANT_TABLES}
        revoked = _cli(database_url, "revoke-reader", "--role", name)
        assert revoked.returncode == 0 and str(b) in revoked.stdout, revoked.stderr
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.fetch("SELECT * FROM chats")


async def test_grant_reader_refuses_unknown_logins_and_the_owner(
    database_url: str, owner: asyncpg.Connection
) -> None:
    unknown = _cli(database_url, "grant-reader", "--tenant", str(uuid.uuid4()), "--role", "no_such_login_x")
    assert unknown.returncode == 2 and "create the login first" in unknown.stderr
    me = await owner.fetchval("SELECT current_user")
    refused = _cli(database_url, "grant-reader", "--tenant", str(uuid.uuid4()), "--role", me)
    assert refused.returncode == 2 and "owns the tables" in refused.stderr


# ------------------------------------------------------------------------------ worker logs

MARKER = "MARKER-7f3a9c-do-not-log"


@asynccontextmanager
async def debug_worker(endpoints: Endpoints, template_database: str, workdir: Path) -> AsyncIterator[Any]:
    """A live deployment whose worker logs at DEBUG, and a reader of its dead letters."""
    async with live_deployment(
        endpoints, template_database, workdir, env={"MINICHAT_LOG_LEVEL": "DEBUG"}
    ) as live:
        names = TopicNames(live.settings.topic_prefix)
        async with TopicReader(live.settings.kafka_bootstrap_servers, names.dead_letters) as dead:
            yield live.gateway, dead, live.db, live.workers[0]


async def test_message_content_never_reaches_the_log_even_at_debug(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with debug_worker(endpoints, template_database, tmp_path) as (gateway, dead, pool, worker):
        tenant, user = uuid.uuid4(), uuid.uuid4()
        chats = [uuid.uuid4() for _ in range(4)]
        commands = [
            gateway.requested(tenant, user, chat, content=f"{MARKER} question {i}", title=f"{MARKER} t")
            for i, chat in enumerate(chats)
        ]
        decisions = await gateway.decide(*commands, timeout=90)
        assert [d["decision"] for d in decisions] == ["allow"] * len(commands)
        usage = {"input_tokens": 11, "output_tokens": 7}
        await gateway.send_provider(
            *(
                gateway.provider("turn.completed", c, content=f"{MARKER} answer", usage=usage)
                for c in commands[:2]
            ),
            gateway.provider("turn.cancelled", commands[2], content=f"{MARKER} partial", usage=usage),
            gateway.provider(
                "turn.failed",
                commands[3],
                error_code="provider_error",
                error_detail=f"{MARKER} upstream said",
            ),
        )
        await gateway.send_usage(gateway.usage(commands[3], 3, 4, model=MARKER))
        # bad records that carry the marker and are dead-lettered
        chat = chats[0]
        bad_values = [
            json.dumps({**commands[0], "event_id": str(uuid.uuid4()), "image_count": MARKER}).encode(),
            json.dumps({**commands[0], "event_id": str(uuid.uuid4()), "content": f"{MARKER}\u0000"}).encode(),
            f'{{"type": "turn.requested", "content": "{MARKER}'.encode(),  # not JSON
            json.dumps({**commands[0], "type": MARKER}).encode(),
            json.dumps([MARKER]).encode(),
            json.dumps({**commands[0], "user_id": MARKER}).encode(),
            MARKER.encode() + b"\xff\xfe",
        ]
        await produce(
            gateway.settings.kafka_bootstrap_servers,
            gateway.topics.turn_requests,
            [(str(chat).encode(), v) for v in bad_values],
        )
        await produce(  # key mismatch: the record is fine, its key is another chat's
            gateway.settings.kafka_bootstrap_servers,
            gateway.topics.turn_requests,
            [(str(chats[1]).encode(), json.dumps({**commands[0], "event_id": str(uuid.uuid4())}).encode())],
        )
        expected_letters = len(bad_values) + 1
        letters = await dead.wait_for(lambda v: len(v) >= expected_letters, timeout=60, what="dead letters")
        assert len(letters) == expected_letters

        async def all_settled() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND settled_at IS NOT NULL", tenant
            )
            return bool(n == len(commands))

        await wait_until(all_settled, timeout=60, what="every turn settled")
        # the content is stored (it is data), only never logged
        stored = await pool.fetchval(
            "SELECT count(*) FROM messages WHERE tenant_id = $1 AND content LIKE '%' || $2 || '%'",
            tenant,
            MARKER,
        )
        assert stored == 7  # 4 user messages, 2 answers, 1 partial

    log = worker.log()
    assert "DEBUG" in log, "the worker really logged at DEBUG"
    assert "dead-letter" in log  # bad records are logged, by position and code
    leaks = [line[:300] for line in log.splitlines() if MARKER in line]
    assert leaks == [], f"message content in the worker log ({len(leaks)} lines), e.g.:\n{leaks[0]}"
    for letter in letters:
        assert MARKER not in letter["error_detail"], letter


LEAKING_TRIGGER = f"""
CREATE FUNCTION leak_content() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'refusing the row %', NEW.content;
END $$;
CREATE TRIGGER leak_content BEFORE INSERT ON messages FOR EACH ROW
    WHEN (NEW.content LIKE '%{MARKER}%') EXECUTE FUNCTION leak_content();
"""


async def test_no_command_logs_message_content_when_it_fails(
    deployment: Any, database_url: str, tmp_path: Path
) -> None:
    """Issue 10, item 8: a failure whose text quotes a row (here a trigger's RAISE with the
    message's content; a constraint's DETAIL does the same) stops the worker and `minichat replay`
    with a report of where and what class, never the text; at DEBUG too."""
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(LEAKING_TRIGGER)
    finally:
        await owner.close()
    env = {**deployment.env(), "MINICHAT_LOG_LEVEL": "DEBUG"}
    names = TopicNames(deployment.settings.topic_prefix)
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    request = Gateway(deployment.settings, None).requested(  # type: ignore[arg-type]  # builds only
        tenant, user, chat, content=f"hello {MARKER}"
    )
    await produce(
        deployment.settings.kafka_bootstrap_servers,
        names.turn_requests,
        [(str(chat).encode(), json.dumps(request).encode())],
    )

    replayed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "minichat.cli", "replay", "--no-progress"],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 70, replayed.stderr[-2000:]
    assert "replay failed" in replayed.stderr and "RaiseError" in replayed.stderr
    assert MARKER not in replayed.stdout + replayed.stderr

    with run_worker(env, tmp_path / "worker.log") as worker:
        status = await asyncio.to_thread(worker.proc.wait, 120)
        log = worker.log()
    assert status == 70, log[-2000:]
    assert "stopping the worker" in log and "RaiseError" in log
    assert MARKER not in log
