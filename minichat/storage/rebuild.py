"""SQL of `minichat replay`'s accounting (the rebuild, `tools/rebuild/`): which records a batch
applied, parked or left unchanged (`counting.py` wraps the worker's handlers with these reads
before and after each step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from uuid import UUID

import asyncpg

from minichat.storage.db import columns
from minichat.storage.digest import row_expression, table_spec

TurnKey = tuple[UUID, UUID, UUID]
"""(tenant_id, chat_id, request_id)"""

_DECISIONS_PRESENT: Final = """
SELECT d.chat_id, d.command_id
FROM turn_decisions d
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, command_id)
  ON d.tenant_id = k.tenant_id AND d.chat_id = k.chat_id AND d.command_id = k.command_id
"""

_PARKED_OF_BATCH: Final = """
SELECT p.source_topic, p.source_partition, p.source_offset
FROM parked_events p
JOIN unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[]) AS k (tenant_id, topic, part, off)
  ON p.tenant_id = k.tenant_id AND p.source_topic = k.topic
 AND p.source_partition = k.part AND p.source_offset = k.off
"""


async def decisions_present(con: asyncpg.Connection, keys: Sequence[TurnKey]) -> set[tuple[UUID, UUID]]:
    """Which (chat, command id) of `keys` ((tenant, chat, command id)) have a stored decision."""
    if not keys:
        return set()
    rows = await con.fetch(_DECISIONS_PRESENT, *columns(keys, 3))
    return {(r["chat_id"], r["command_id"]) for r in rows}


async def parked_of_batch(
    con: asyncpg.Connection, keys: Sequence[tuple[UUID, str, int, int]]
) -> set[tuple[str, int, int]]:
    """Which of these records ((tenant, topic, partition, offset)) sit in `parked_events`."""
    if not keys:
        return set()
    rows = await con.fetch(_PARKED_OF_BATCH, *columns(keys, 4))
    return {(r["source_topic"], r["source_partition"], r["source_offset"]) for r in rows}


async def turn_fingerprint_sql(con: asyncpg.Connection) -> str:
    """md5 of each `chat_turns` row over the digest's covered columns, for a set of turn keys."""
    spec = await table_spec(con, "chat_turns")
    return f"""
SELECT t.tenant_id, t.chat_id, t.request_id, md5({row_expression(spec.columns, "t")}) AS fingerprint
FROM chat_turns t
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, request_id)
  ON t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
"""


async def turn_fingerprints(
    con: asyncpg.Connection, sql: str, turns: Sequence[TurnKey]
) -> dict[TurnKey, str]:
    if not turns:
        return {}
    rows = await con.fetch(sql, *columns(turns, 3))
    return {(r["tenant_id"], r["chat_id"], r["request_id"]): r["fingerprint"] for r in rows}
