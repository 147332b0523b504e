"""The applied order is a fact: in each batch transaction the worker records, per partition set,
the exact order in which it applied the set's records, and the relay publishes it to `order-log`
(partition *p* holds set *p*'s order). A rebuild applies each set in the recorded order
(`tools/rebuild/recorded_order.py`), so rebuild equality no longer rests on clocks agreeing.

An entry is compact: runs of (topic, first offset, last offset) in applied order, consecutive
offsets of one topic collapsed into one run. It is written in the batch's transaction once the
batch's locks are held: only committed transactions leave entries, and one re-applying the same
records (a retry, a restart before the outputs were acknowledged, a zombie's batch) waits on their
locks for the first to commit, so its entry comes later on the topic. The rule a rebuild follows:
the first entry naming a record wins (the later application changed nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import asyncpg

from minichat.models.events import OrderApplied
from minichat.processors.pipeline import Decoded, Producer
from minichat.processors.records import Output, SourceRecord
from minichat.storage.combined import defer
from minichat.storage.order_log import OrderRow, delete_order, fetch_order, insert_order, order_part

logger = logging.getLogger(__name__)

Run = tuple[str, int, int]
"""(topic, first offset, last offset)"""

Apply = Callable[[asyncpg.Connection], Awaitable[list[Output]]]


def compact(records: Iterable[SourceRecord], prefix: str = "") -> dict[int, list[Run]]:
    """Per partition set, in first-seen order, the records as runs in the order given; a record
    that continues the set's last run (same topic, next offset) extends it. Topics lose `prefix`."""
    sets: dict[int, list[Run]] = {}
    for r in records:
        runs = sets.setdefault(r.partition, [])
        topic = r.topic.removeprefix(prefix)
        if runs and runs[-1][0] == topic and runs[-1][2] + 1 == r.offset:
            runs[-1] = (topic, runs[-1][1], r.offset)
        else:
            runs.append((topic, r.offset, r.offset))
    return sets


def entries(records: Iterable[SourceRecord], prefix: str) -> list[tuple[int, str]]:
    """(partition set, `order.applied` JSON) per set the records belong to."""
    return [
        (number, OrderApplied(partition_set=number, runs=runs).model_dump_json())  # type: ignore[arg-type]
        for number, runs in compact(records, prefix).items()
    ]


def recording(apply: Apply, records: Sequence[SourceRecord], prefix: str) -> Apply:
    """`apply`, and (same transaction) the order of `records`: the order it applied them in. In a
    batch transaction's frame (`storage.combined`) the rows go out with its first write, after
    the batch's locks were taken; without one, after `apply`."""
    rows = entries(records, prefix)

    async def run(con: asyncpg.Connection) -> list[Output]:
        part = order_part(rows)
        if part is None or defer(part):
            return await apply(con)
        outputs = await apply(con)
        await insert_order(con, rows)
        return outputs

    return run


class OrderRecorder:
    """`recording` for one deployment's topics: what the engine wraps each batch's apply with."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, apply: Apply, applied: Sequence[SourceRecord | Decoded[Any]]) -> Apply:
        """`apply` recording the order of `applied` (records, or decoded records)."""
        records = [r.record if isinstance(r, Decoded) else r for r in applied]
        return recording(apply, records, self.prefix)


async def relay_order(con: asyncpg.Connection, producer: Producer, topic: str, batch_max: int) -> int:
    """Publish the stored entries in id order, each to partition = its set (key: the set number),
    wait for every acknowledgement, then delete them; returns how many. A crash in between
    publishes them again: a rebuild keeps the first copy of a record's position (a copy changes
    nothing)."""
    published = 0
    while True:
        rows = await fetch_order(con, batch_max)
        if not rows:
            return published
        await _publish(producer, topic, rows)
        await delete_order(con, rows)
        published += len(rows)
        if len(rows) < batch_max:
            return published


async def _publish(producer: Producer, topic: str, rows: Sequence[OrderRow]) -> None:
    """Sent in id order (one producer: each partition keeps it); every send awaited, then the
    first failure raised."""
    futures = [
        await producer.send(
            topic, str(r.partition_set).encode("ascii"), r.payload, r.partition_set, None, None
        )
        for r in rows
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
