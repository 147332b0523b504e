"""How workers share the work: the input positions kept with the state (read on assignment,
written in every batch), and the advisory locks that elect the leader of each timer.

Both are operator data (no tenant): the positions' statements carry the consumer group instead of
a tenant, the locks name a timer (see tests/unit/test_sql_tenant_scope.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final, TypeVar

import asyncpg

from minichat.storage import combined
from minichat.storage.combined import Frame, Part
from minichat.storage.db import columns

T = TypeVar("T")

SYSTEM_LEVEL: Final = (
    "how workers share the work: a consumer group's input positions (keyed by the group) and the "
    "advisory locks that elect the timers' leaders; operator data, no tenant"
)

TopicPartitionKey = tuple[str, int]
"""(topic, partition)"""

_LOAD: Final = """
SELECT p.topic, p.partition, p.next_offset
FROM consumer_positions p
JOIN unnest($2::text[], $3::int[]) AS k (topic, partition)
  ON p.topic = k.topic AND p.partition = k.partition
WHERE p.group_id = $1
"""

_ENSURE: Final = """
INSERT INTO consumer_positions AS p (group_id, topic, partition, next_offset)
SELECT $1, k.topic, k.partition, k.next_offset
FROM unnest($2::text[], $3::int[], $4::bigint[]) AS k (topic, partition, next_offset)
ORDER BY k.topic, k.partition
ON CONFLICT (group_id, topic, partition) DO NOTHING
"""

CLAIM_LOCK: Final = _LOAD + "ORDER BY p.topic, p.partition\nFOR UPDATE OF p"
CLAIM_SHARE: Final = _LOAD + "ORDER BY p.topic, p.partition\nFOR SHARE OF p"

_UPSERT: Final = """
INSERT INTO consumer_positions AS p (group_id, topic, partition, next_offset)
SELECT k.group_id, k.topic, k.partition, k.next_offset
FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[]) AS k (group_id, topic, partition, next_offset)
ORDER BY k.group_id, k.topic, k.partition
ON CONFLICT (group_id, topic, partition) DO UPDATE
SET next_offset = GREATEST(p.next_offset, EXCLUDED.next_offset), updated_at = now()
"""


def acknowledged_group(group_id: str) -> str:
    """The rows (same table, same statements) that keep up to where a group's outputs were
    acknowledged: where to resume when Kafka's committed offsets are gone (`processors/resume.py`).
    Never claimed: whichever worker saw the acknowledgement writes, and the offset only grows."""
    return f"{group_id}/acknowledged"


class PositionConflict(RuntimeError):
    """Another worker moved a partition this batch was going to apply: the batch is abandoned
    (its transaction rolls back) and the partitions are re-read from the stored positions."""

    def __init__(self, moved: Mapping[TopicPartitionKey, tuple[int | None, int | None]]) -> None:
        self.moved = dict(moved)
        described = ", ".join(f"{t}[{p}] expected {e} stored {s}" for (t, p), (e, s) in sorted(moved.items()))
        super().__init__(f"stored positions moved under this worker: {described}")


async def load_positions(
    con: asyncpg.Connection, group_id: str, partitions: Iterable[TopicPartitionKey]
) -> dict[TopicPartitionKey, int]:
    keys = sorted(set(partitions))
    if not keys:
        return {}
    rows = await con.fetch(_LOAD, group_id, *columns(keys, 2))
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


async def prepare_positions(
    con: asyncpg.Connection, group_id: str, beginnings: Mapping[TopicPartitionKey, int]
) -> dict[TopicPartitionKey, int]:
    """Every partition's stored position, after making a row (at the log's beginning: nothing of
    it applied) for each that has none. A claim locks rows, so a row must exist before anyone can
    claim it: without one, two owners of a new partition would both pass an empty claim."""
    keys = sorted(beginnings)
    if not keys:
        return {}
    async with con.transaction():
        await con.execute(_ENSURE, group_id, *columns([(t, p, beginnings[(t, p)]) for t, p in keys], 3))
        return await load_positions(con, group_id, keys)


async def claim_positions(
    con: asyncpg.Connection,
    group_id: str,
    expected: Mapping[TopicPartitionKey, int | None],
    *,
    shared: bool = False,
) -> None:
    """Lock the batch's position rows and check they still say what this worker last read or
    wrote (`prepare_positions` made the rows before). Two workers that both believe they own a
    partition (a rebalance racing a slow batch) serialise here, and the later one finds the row
    moved and backs off.

    `shared`: for the concurrent groups of one batch, which store no position (the batch's own
    exclusive claim stores them once every group committed). Another worker's exclusive claim
    waits for all of them, and one that came first makes them find the rows moved."""
    if not expected:
        return
    rows = await con.fetch(CLAIM_SHARE if shared else CLAIM_LOCK, group_id, *columns(sorted(expected), 2))
    check_claim(expected, {(r["topic"], r["partition"]): r["next_offset"] for r in rows})


def check_claim(
    expected: Mapping[TopicPartitionKey, int | None], stored: Mapping[TopicPartitionKey, int]
) -> None:
    """Raise `PositionConflict` unless every claimed row says what this worker expected."""
    moved = {key: (want, stored.get(key)) for key, want in expected.items() if stored.get(key) != want}
    if moved:
        raise PositionConflict(moved)


def positions_part(
    group_id: str,
    next_offsets: Mapping[TopicPartitionKey, int],
    acknowledged: Mapping[TopicPartitionKey, int] | None = None,
) -> Part | None:
    """`store_positions` as a part of another statement (`combined.execute_parts`)."""
    rows = [(group_id, t, p, next_offsets[(t, p)]) for t, p in sorted(next_offsets)]
    if acknowledged:
        ack_group = acknowledged_group(group_id)
        rows += [(ack_group, t, p, acknowledged[(t, p)]) for t, p in sorted(acknowledged)]
    return Part(_UPSERT, columns(rows, 4)) if rows else None


async def store_positions(
    con: asyncpg.Connection,
    group_id: str,
    next_offsets: Mapping[TopicPartitionKey, int],
    acknowledged: Mapping[TopicPartitionKey, int] | None = None,
) -> None:
    """Store the group's positions and, in the same statement, how far its outputs were
    acknowledged (`acknowledged_group`); offsets only grow."""
    part = positions_part(group_id, next_offsets, acknowledged)
    if part is not None:
        await con.execute(part.sql, *part.params)


async def framed(
    con: asyncpg.Connection,
    apply: Callable[[asyncpg.Connection], Awaitable[T]],
    group_id: str,
    expected: Mapping[TopicPartitionKey, int | None],
    store: Part | None,
    *,
    shared: bool = False,
) -> T:
    """Claim the positions (a statement of its own, the transaction's first), then `apply` inside a
    batch transaction's frame (`combined.Frame`): `store` (the positions after the batch) goes out
    with its first write, or here when it wrote nothing."""
    await claim_positions(con, group_id, expected, shared=shared)
    token = combined.enter(Frame([store] if store is not None else []))
    try:
        result = await apply(con)
        await combined.execute_parts(con, [])
    finally:
        combined.leave(token)
    return result


# ------------------------------------------------------------------- leaders of the timers
_TRY_LOCK: Final = "SELECT pg_try_advisory_lock($1, $2)"
_UNLOCK: Final = "SELECT pg_advisory_unlock($1, $2)"


async def try_lock(con: asyncpg.Connection, lock: tuple[int, int]) -> bool:
    """Take the session lock if nobody holds it; never waits."""
    taken: bool = await con.fetchval(_TRY_LOCK, *lock)
    return taken


async def unlock(con: asyncpg.Connection, lock: tuple[int, int]) -> None:
    await con.execute(_UNLOCK, *lock)
