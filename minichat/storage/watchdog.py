"""The watchdog's queries: stale turns by the processing clock, and when they were last signalled.

Only processing-clock columns are read for staleness (`last_progress_seen_at`, `terminal_seen_at`)
and only `orphan_sent_at` / `grace_sent_at` are written: the watchdog never changes a turn's state.
The scans are system-level (every tenant's turns): both walk `idx_chat_turns_open`, the small set
of turns not settled yet (migration 0012), and filter on the heap, so a turn's own updates stay HOT;
the marks carry the tenant. Each statement runs on its own (no transaction is held across a send).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg


@dataclass(frozen=True, slots=True)
class StaleTurn:
    id: UUID
    tenant_id: UUID
    chat_id: UUID
    request_id: UUID
    progress_seq: int
    seen_now: datetime  # the database's now() when the scan ran


# A signal is sent once per staleness: again only when the last one is itself older than the
# timeout (the event may have lost a race with progress, or the turn went stale once more).
_FIND_ORPHANS = """
SELECT id, tenant_id, chat_id, request_id, progress_seq, now() AS seen_now
FROM chat_turns
WHERE settled_at IS NULL AND state = 'running'  -- a running turn is never settled: the open index
  AND last_progress_seen_at < now() - make_interval(secs => $1)
  AND (orphan_sent_at IS NULL OR orphan_sent_at < now() - make_interval(secs => $1))
ORDER BY last_progress_seen_at, id
LIMIT $2
"""

_FIND_GRACE_EXPIRED = """
SELECT id, tenant_id, chat_id, request_id, progress_seq, now() AS seen_now
FROM chat_turns
WHERE state <> 'running' AND settled_at IS NULL
  AND terminal_seen_at < now() - make_interval(secs => $1)
  AND (grace_sent_at IS NULL OR grace_sent_at < now() - make_interval(secs => $1))
ORDER BY terminal_seen_at, id
LIMIT $2
"""

# One turn per statement, each its own transaction: a mark holds at most the one row it waits
# for, so it can never close a cycle with an engine batch, which locks turns across its steps in
# no fixed order. (One statement over many rows holds the rows it has while it waits for the
# next.) The watchdog sends at most `batch_max` signals a tick and rarely any: the round trips are
# cheap next to that.
_MARK = """
UPDATE chat_turns SET {column} = now() WHERE tenant_id = $1 AND id = $2
"""
_MARK_ORPHAN_SENT = _MARK.format(column="orphan_sent_at")
_MARK_GRACE_SENT = _MARK.format(column="grace_sent_at")


def _turns(rows: Sequence[asyncpg.Record]) -> list[StaleTurn]:
    return [
        StaleTurn(
            id=r["id"],
            tenant_id=r["tenant_id"],
            chat_id=r["chat_id"],
            request_id=r["request_id"],
            progress_seq=r["progress_seq"],
            seen_now=r["seen_now"],
        )
        for r in rows
    ]


async def find_orphans(con: asyncpg.Connection, timeout_s: float, limit: int) -> list[StaleTurn]:
    """Running turns with no progress seen for `timeout_s`, not yet signalled for it."""
    return _turns(await con.fetch(_FIND_ORPHANS, float(timeout_s), limit))


async def find_grace_expired(con: asyncpg.Connection, grace_s: float, limit: int) -> list[StaleTurn]:
    """Terminal, unsettled turns past the usage grace, not yet signalled for it."""
    return _turns(await con.fetch(_FIND_GRACE_EXPIRED, float(grace_s), limit))


async def mark_orphan_sent(con: asyncpg.Connection, turns: Sequence[StaleTurn]) -> None:
    for turn in sorted(turns, key=lambda t: t.id):
        await con.execute(_MARK_ORPHAN_SENT, turn.tenant_id, turn.id)


async def mark_grace_sent(con: asyncpg.Connection, turns: Sequence[StaleTurn]) -> None:
    for turn in sorted(turns, key=lambda t: t.id):
        await con.execute(_MARK_GRACE_SENT, turn.tenant_id, turn.id)
