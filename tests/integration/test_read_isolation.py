"""The read API reads under row-level security, not only through its own `tenant_id = $1` filters.

Every API query filters by the caller's tenant, so a test of the API alone passes even if
`reading_as` stopped reading as `minichat_reader` for that tenant (docs/security.md §6). These
tests take the filter away instead: a query with no tenant filter, and each of the API's real
reads with its tenant filter rewritten to a no-op, run through `reading_as` on a pool made like
the worker's (`create_pool`), over a database that holds two tenants' rows in every tenant table.
They see their own tenant's rows and nothing of the other's; without `read_as_tenant` they fail.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date

import asyncpg
import pytest

from minichat.settings import Settings
from minichat.storage import read_api
from minichat.storage.db import create_pool
from minichat.storage.read_api import chat_messages, chat_turn, reading_as, spend_rows, user_quota
from minichat.storage.readers import READER_ROLE
from tests.integration.test_security import AT, seed_tenant

pytestmark = pytest.mark.integration

PAGE_MAX_BYTES: int = Settings.model_fields["read_page_max_bytes"].default
DAY = date(2026, 3, 1)  # the period seed_tenant's quota rows are in
# the API's statements, each with `tenant_id = $1` (`t.tenant_id = $1`, ...) as its tenant filter
API_STATEMENTS = (
    "_LIVE_CHAT",
    "_MESSAGES",
    "_TURN",
    "_REJECTED",
    "_KNOWN_USER",
    "_QUOTA_ROWS",
    "_SPEND_DAYS",
    "_SPEND_TOTALS",
    "_SPEND_BY_MODEL",
)
SPEND_KEYS = (("user",), ("user", "model"))


async def settle_seeded_quota(owner: asyncpg.Connection) -> None:
    """Give the seeded daily rows a settled turn, so the spend report has something to show."""
    await owner.execute(
        "UPDATE quota_usage SET calls = 1, spent_credits_micro = 7, by_model = '{\"m\": [1, 0, 0, 7]}'"
        " WHERE tenant_id IS NOT NULL"
    )


_TENANT_FILTER = re.compile(r"\b(?:\w+\.)?tenant_id\s*=\s*\$1\b")


def without_tenant_filter(sql: str) -> str:
    """`sql` with each `tenant_id = $1` made true (`$1` stays typed, so the parameters still fit)."""
    stripped = _TENANT_FILTER.sub("$1::uuid IS NOT NULL", sql)
    assert stripped != sql and "$1::uuid IS NOT NULL" in stripped, sql
    assert not re.search(r"tenant_id\s*=\s*\$", stripped), stripped
    return stripped


@dataclass(frozen=True)
class Ids:
    """One tenant's seeded ids, as the API would be asked for them."""

    tenant: uuid.UUID
    chat: uuid.UUID
    request: uuid.UUID
    user: uuid.UUID
    refused_request: uuid.UUID  # a decision without a turn: chat_turn's second read


async def ids_of(owner: asyncpg.Connection, tenant: uuid.UUID) -> Ids:
    turn = await owner.fetchrow(
        "SELECT chat_id, request_id, requester_user_id FROM chat_turns WHERE tenant_id = $1 LIMIT 1", tenant
    )
    assert turn is not None
    refused = uuid.uuid4()
    await owner.execute(
        "INSERT INTO turn_decisions (tenant_id, chat_id, command_id, command, command_event_id,"
        " request_id, decision, error_code, payload, decided_at)"
        " VALUES ($1, $2, $3, 'turn.requested', $4, $3, 'reject', 'quota_exceeded', $5::jsonb, $6)",
        tenant,
        turn["chat_id"],
        refused,
        uuid.uuid4(),
        f'{{"tenant": "{tenant}"}}',
        AT,
    )
    return Ids(tenant, turn["chat_id"], turn["request_id"], turn["requester_user_id"], refused)


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The migrating role's connection, which owns the tables; it writes the rows."""
    con = await asyncpg.connect(database_url)
    try:
        yield con
    finally:
        await con.close()


@pytest.fixture
async def two_tenants(owner: asyncpg.Connection) -> tuple[Ids, Ids]:
    a, b = uuid.uuid4(), uuid.uuid4()
    await seed_tenant(owner, a, 2)
    await seed_tenant(owner, b, 3)
    return await ids_of(owner, a), await ids_of(owner, b)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The worker's pool, made the way the worker makes it."""
    pool = await create_pool(Settings(database_url=database_url))
    try:
        yield pool
    finally:
        await pool.close()


async def contents(
    con: asyncpg.Connection, tenant: uuid.UUID, chat: uuid.UUID, limit: int
) -> set[str] | None:
    """The contents of a messages page read as the API reads it (None: not this tenant's chat)."""
    rows = await chat_messages(con, tenant, chat, limit, None, PAGE_MAX_BYTES)
    return None if rows is None else {row.fields["content"] async for row in rows}


async def tenant_tables(owner: asyncpg.Connection) -> list[str]:
    """Every relation with a `tenant_id` column that `minichat_reader` may read, from the catalog:
    a new one is covered the day it is granted."""
    rows = await owner.fetch(
        "SELECT table_name FROM information_schema.columns"
        " WHERE column_name = 'tenant_id' AND table_schema = current_schema()"
        " AND has_table_privilege($1, format('%I.%I', table_schema, table_name), 'SELECT') ORDER BY 1",
        READER_ROLE,
    )
    tables = [r["table_name"] for r in rows]
    assert {"chats", "chat_turns", "messages", "quota_usage", "turn_decisions"} <= set(tables)
    return tables


async def test_reading_as_shows_one_tenant_in_every_table_without_a_filter(
    owner: asyncpg.Connection, pool: asyncpg.Pool, two_tenants: tuple[Ids, Ids]
) -> None:
    a, b = two_tenants
    tables = await tenant_tables(owner)
    everyone = {t: await owner.fetchval(f"SELECT count(DISTINCT tenant_id) FROM {t}") for t in tables}
    assert everyone == {t: 2 for t in tables}, "seed_tenant must write a row of each tenant in every table"
    for me in (a, b):
        async with reading_as(pool, me.tenant) as con:
            seen = {
                t: {r["tenant_id"] for r in await con.fetch(f"SELECT tenant_id FROM {t}")} for t in tables
            }
        assert seen == {t: {me.tenant} for t in tables}


async def test_an_unfiltered_read_is_open_outside_reading_as(
    owner: asyncpg.Connection,
    pool: asyncpg.Pool,
    two_tenants: tuple[Ids, Ids],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The canary: with its tenant filter removed, an API read as the worker's own role does show
    another tenant's messages, so the tests below see nothing only because of `reading_as`."""
    a, b = two_tenants
    statements = {n for n, v in vars(read_api).items() if isinstance(v, str) and "SELECT" in v}
    assert statements == set(API_STATEMENTS), "a new API read: add it to API_STATEMENTS"
    for name in API_STATEMENTS:
        monkeypatch.setattr(read_api, name, without_tenant_filter(getattr(read_api, name)))
    await settle_seeded_quota(owner)
    async with pool.acquire() as con, con.transaction():
        assert await contents(con, a.tenant, b.chat, 10) == {f"secret of {b.tenant}"}
        assert await chat_turn(con, a.tenant, b.chat, b.request) is not None
        assert await user_quota(con, a.tenant, b.user, DAY, DAY)
        for keys in SPEND_KEYS:
            rows = await spend_rows(con, a.tenant, DAY, DAY, keys, None, 100)
            assert b.user in {r["user_id"] for r in rows}


@pytest.mark.parametrize("filtered", [False, True], ids=["tenant_filter_removed", "as_written"])
async def test_api_reads_with_another_tenants_ids_see_nothing(
    owner: asyncpg.Connection,
    pool: asyncpg.Pool,
    two_tenants: tuple[Ids, Ids],
    monkeypatch: pytest.MonkeyPatch,
    filtered: bool,
) -> None:
    a, b = two_tenants
    await settle_seeded_quota(owner)
    if not filtered:
        for name in API_STATEMENTS:
            monkeypatch.setattr(read_api, name, without_tenant_filter(getattr(read_api, name)))
    async with reading_as(pool, a.tenant) as con:
        # B's ids, asked for as A: nothing, as if they did not exist
        assert await contents(con, a.tenant, b.chat, 500) is None
        assert await chat_turn(con, a.tenant, b.chat, b.request) is None
        assert await chat_turn(con, a.tenant, b.chat, b.refused_request) is None
        assert await user_quota(con, a.tenant, b.user, DAY, DAY) is None
        # A's own: found, so the reads above are not empty by construction
        assert await contents(con, a.tenant, a.chat, 500) == {f"secret of {a.tenant}"}
        turn = await chat_turn(con, a.tenant, a.chat, a.request)
        assert turn is not None and turn["state"] == "running"
        refused = await chat_turn(con, a.tenant, a.chat, a.refused_request)
        assert refused == {"state": None, "decision": {"tenant": str(a.tenant)}}
        quota = await user_quota(con, a.tenant, a.user, DAY, DAY)
        assert quota is not None and len(quota) == 1
        # the spend report: A's users only, B's user asked for by id: nothing
        for keys in SPEND_KEYS:
            users = {r["user_id"] for r in await spend_rows(con, a.tenant, DAY, DAY, keys, None, 100)}
            assert a.user in users and b.user not in users
            assert await spend_rows(con, a.tenant, DAY, DAY, keys, b.user, 100) == []
