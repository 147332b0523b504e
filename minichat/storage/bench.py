"""SQL of `minichat bench`: its scratch databases (created and dropped), the drain's progress and
correctness counts, the rows written (PostgreSQL's statistics), and the ceiling's admission-shaped
writes (`bench/ceiling.py` says why they are written that way).

The bench owns every row of its scratch databases, so its counts span all tenants on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Final
from uuid import UUID

import asyncpg

SYSTEM_LEVEL: Final = (
    "the bench's scratch databases: created, dropped and counted whole (the bench owns every row)"
)

# ------------------------------------------------------------------- scratch databases


async def create_database(admin: asyncpg.Connection, name: str) -> None:
    """`name` must be an identifier the bench generated (it is quoted, never a parameter)."""
    await admin.execute(f'CREATE DATABASE "{name}"')


async def drop_database(admin: asyncpg.Connection, name: str, within: float = 30.0) -> None:
    """Drop `name`. A plain DROP cancels an autovacuum worker on it (WITH (FORCE) would need the
    right to signal that superuser process); sessions left by a killed worker need FORCE."""
    deadline = time.monotonic() + within
    while True:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            return
        except asyncpg.ObjectInUseError:
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except asyncpg.InsufficientPrivilegeError:
                if time.monotonic() > deadline:
                    raise
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------- the drain's counts

_DRAIN: Final = """
SELECT
  (SELECT count(*) FROM turn_decisions) AS decided,
  (SELECT count(*) FROM chat_turns WHERE settled_at IS NULL) AS unsettled,
  (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished,
  (SELECT count(*) FROM parked_events) AS parked
"""

_DECISIONS: Final = """
SELECT decision, coalesce(error_code, '-') AS error_code, count(*) AS n
FROM turn_decisions GROUP BY 1, 2 ORDER BY 1, 2
"""

_TURNS: Final = """
SELECT count(*) AS turns,
       count(*) FILTER (WHERE settled_at IS NOT NULL) AS settled,
       count(*) FILTER (WHERE settlement_method = 'estimated') AS estimated,
       count(*) FILTER (WHERE adjusted_at IS NOT NULL) AS adjusted
FROM chat_turns
"""


@dataclass(frozen=True)
class DrainCounts:
    decided: int
    unsettled: int
    unpublished: int
    parked: int


@dataclass(frozen=True)
class TurnCounts:
    turns: int
    settled: int
    estimated: int
    adjusted: int


async def drain_counts(con: asyncpg.Connection) -> DrainCounts:
    """What a draining deployment has decided, and still has to settle, publish or unpark."""
    return DrainCounts(**await _counts(con, _DRAIN))


async def decision_counts(con: asyncpg.Connection) -> dict[str, int]:
    """`decision/error_code` -> stored decisions."""
    return {f"{r['decision']}/{r['error_code']}": int(r["n"]) for r in await con.fetch(_DECISIONS)}


async def turn_counts(con: asyncpg.Connection) -> TurnCounts:
    return TurnCounts(**await _counts(con, _TURNS))


async def _counts(con: asyncpg.Connection, sql: str) -> dict[str, int]:
    """The one row of a counting statement, by column name (the dataclass's field names)."""
    row = await con.fetchrow(sql)
    assert row is not None
    return {name: int(value) for name, value in row.items()}


# ------------------------------------------------------------------- rows written (statistics)

_TABLE_WRITES: Final = """
SELECT relname AS name, n_tup_ins AS inserted, n_tup_upd AS updated, n_tup_hot_upd AS hot_updated,
       n_tup_del AS deleted
FROM pg_stat_user_tables ORDER BY relname
"""

_OTHER_SESSIONS: Final = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


@dataclass(frozen=True)
class TableWrites:
    """Rows a table's statistics counted so far (`pg_stat_user_tables`)."""

    inserted: int
    updated: int
    hot_updated: int
    deleted: int


async def table_writes(con: asyncpg.Connection) -> dict[str, TableWrites]:
    """Per table of the connection's database, the rows inserted, updated (HOT or not) and deleted
    so far, as far as the sessions have reported them: a busy session reports its counts at most
    once a second, an idle one within 10 s, an ending one as it ends (`wait_for_no_sessions`)."""
    rows = await con.fetch(_TABLE_WRITES)
    return {
        str(r["name"]): TableWrites(*(int(r[k]) for k in ("inserted", "updated", "hot_updated", "deleted")))
        for r in rows
    }


async def wait_for_no_sessions(con: asyncpg.Connection, within: float = 15.0) -> bool:
    """Poll until no other client session is connected to the connection's database (their row
    counts are then all in the statistics); False when some still are after `within` seconds."""
    deadline = time.monotonic() + within
    while await con.fetchval(_OTHER_SESSIONS):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ------------------------------------------------------------------- the ceiling's writes

_CHATS: Final = """
INSERT INTO chats (id, tenant_id, user_id, model, title, created_at, updated_at)
SELECT id, tenant_id, user_id, model, NULL, now(), now()
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[]) AS k (id, tenant_id, user_id, model)
"""

_CEILING_TURNS: Final = """
INSERT INTO chat_turns (
    id, tenant_id, chat_id, request_id, requester_type, requester_user_id, state,
    selected_model, effective_model, reserve_tokens, max_output_tokens_applied, reserved_credits_micro,
    policy_version_applied, minimal_generation_floor_applied, period_daily, period_monthly,
    started_at, last_progress_at, updated_at)
SELECT id, tenant_id, chat_id, request_id, 'user', user_id, 'running',
    model, model, reserve_tokens, max_output, reserved, $9, 50, $10, $11, at, at, at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[], $7::bigint[],
            $8::bigint[], $12::timestamptz[], $13::int[])
     AS k (id, tenant_id, chat_id, request_id, user_id, model, reserve_tokens, reserved, at, max_output)
ON CONFLICT (chat_id, request_id) DO NOTHING
"""

_MESSAGES: Final = """
INSERT INTO messages (id, tenant_id, chat_id, request_id, role, content, request_kind, created_at)
SELECT id, tenant_id, chat_id, request_id, 'user', content, 'chat', at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::timestamptz[])
     AS k (id, tenant_id, chat_id, request_id, content, at)
ON CONFLICT DO NOTHING
"""

_RESERVES: Final = """
INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket,
                         reserved_credits_micro, updated_at)
SELECT id, tenant_id, user_id, period_type, period_start, 'total', amount, at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::date[], $6::bigint[], $7::timestamptz[])
     AS k (id, tenant_id, user_id, period_type, period_start, amount, at)
ON CONFLICT (tenant_id, user_id, period_type, period_start, bucket) DO UPDATE
SET reserved_credits_micro = quota_usage.reserved_credits_micro + EXCLUDED.reserved_credits_micro,
    updated_at = GREATEST(quota_usage.updated_at, EXCLUDED.updated_at)
"""


async def insert_chats(
    con: asyncpg.Connection, ids: list[UUID], tenants: list[UUID], users: list[UUID], models: list[str]
) -> None:
    await con.execute(_CHATS, ids, tenants, users, models)


async def write_admissions(
    con: asyncpg.Connection,
    turns: Sequence[list[Any]],
    messages: Sequence[list[Any]],
    reserves: Sequence[list[Any]],
    day: date,
    policy_version: int,
) -> None:
    """One ceiling batch in one transaction, as column arrays: `turns` (id, tenant, chat, request,
    user, model, reserve tokens, reserved credits, at, max output), `messages` (id, tenant, chat,
    request, content, at), `reserves` (id, tenant, user, period type, period start, amount, at)."""
    async with con.transaction():
        t = turns
        await con.execute(_CEILING_TURNS, *t[:8], policy_version, day, day.replace(day=1), t[8], t[9])
        await con.execute(_MESSAGES, *messages)
        await con.execute(_RESERVES, *reserves)
