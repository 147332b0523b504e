"""Recorded decisions for a rebuild: `turn-decisions` read into a temporary table first, then
looked up per batch by `(chat_id, command_id)` (a table scales where a dict of every decision of
a long log would not).

The table is temporary, so `minichat replay` runs every batch on one connection. The tenant is in
every key: a decision counts only for a command of its own tenant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final
from uuid import UUID

import asyncpg

from minichat.storage.db import columns

RecordedKey = tuple[UUID, UUID, UUID]
"""(tenant_id, chat_id, command_id)"""

_CREATE: Final = """
CREATE TEMPORARY TABLE IF NOT EXISTS recorded_decisions (
    tenant_id   uuid   NOT NULL,
    chat_id     uuid   NOT NULL,
    command_id  uuid   NOT NULL,
    replay      boolean NOT NULL,
    payload     jsonb  NOT NULL,
    PRIMARY KEY (tenant_id, chat_id, command_id)
) ON COMMIT PRESERVE ROWS
"""

# The first copy wins; a `replay: true` copy counts only when no first copy was read (the worker
# crashed between its commit and the first send).
_INSERT: Final = """
INSERT INTO recorded_decisions (tenant_id, chat_id, command_id, replay, payload)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::boolean[], $5::jsonb[])
ON CONFLICT (tenant_id, chat_id, command_id) DO UPDATE
SET replay = EXCLUDED.replay, payload = EXCLUDED.payload
WHERE recorded_decisions.replay AND NOT EXCLUDED.replay
"""

_LOOKUP: Final = """
SELECT r.chat_id, r.command_id, r.payload
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, command_id)
JOIN recorded_decisions r USING (tenant_id, chat_id, command_id)
"""


async def create_recorded(con: asyncpg.Connection) -> None:
    await con.execute(_CREATE)


async def insert_recorded(
    con: asyncpg.Connection, rows: Sequence[tuple[UUID, UUID, UUID, bool, dict[str, Any]]]
) -> None:
    latest: dict[RecordedKey, tuple[UUID, UUID, UUID, bool, dict[str, Any]]] = {}
    for row in rows:  # one row per key and statement: first copies beat replayed ones
        key = (row[0], row[1], row[2])
        if key not in latest or (latest[key][3] and not row[3]):
            latest[key] = row
    if latest:
        await con.execute(_INSERT, *columns(list(latest.values()), 5))


async def lookup_recorded(
    con: asyncpg.Connection, keys: Iterable[RecordedKey]
) -> dict[tuple[UUID, UUID], dict[str, Any]]:
    wanted = list(set(keys))
    if not wanted:
        return {}
    rows = await con.fetch(_LOOKUP, *columns(wanted, 3))
    return {(r["chat_id"], r["command_id"]): r["payload"] for r in rows}
