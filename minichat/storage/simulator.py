"""SQL of `minichat simulate`'s turn watcher (tools/simulator/watch.py): where the simulator's turns
stand, and which of its early events the processor parked, for every waiting chat in one statement
each. Scoped by each turn's tenant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import asyncpg

from minichat.storage.db import columns

TurnKey = tuple[UUID, UUID, UUID]
"""(tenant_id, chat_id, request_id)"""

_TURNS: Final = """
SELECT t.chat_id, t.request_id, t.state, t.settled_at IS NOT NULL AS settled, t.usage_known
FROM chat_turns t
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k(tenant_id, chat_id, request_id)
  ON t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
"""
_PARKED: Final = """
SELECT DISTINCT p.chat_id, p.request_id
FROM parked_events p
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k(tenant_id, chat_id, request_id)
  ON p.tenant_id = k.tenant_id AND p.chat_id = k.chat_id AND p.request_id = k.request_id
"""


@dataclass(frozen=True)
class TurnStand:
    state: str
    settled: bool
    usage_known: bool


async def turn_stands(con: asyncpg.Connection, keys: Sequence[TurnKey]) -> dict[tuple[UUID, UUID], TurnStand]:
    """The stored turns among `keys`, by (chat_id, request_id)."""
    rows = await con.fetch(_TURNS, *columns(keys, 3))
    return {
        (r["chat_id"], r["request_id"]): TurnStand(r["state"], r["settled"], r["usage_known"]) for r in rows
    }


async def parked_requests(con: asyncpg.Connection, keys: Sequence[TurnKey]) -> set[tuple[UUID, UUID]]:
    """(chat_id, request_id) of `keys` with at least one event in `parked_events`."""
    rows = await con.fetch(_PARKED, *columns(keys, 3))
    return {(r["chat_id"], r["request_id"]) for r in rows}
