"""Applying the log: each partition set's records in the order the workers recorded on `order-log`
(`recorded_order.py`), past its end the input partitions merged with the worker's own merge
(`processors/merge.py`); applied in batches with the worker's own handlers, one transaction per
batch, all on one connection; what the handlers produce is counted, never sent."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from minichat.models.topics import TopicNames
from minichat.processors.batches import MergedBatches
from minichat.processors.errors import RetryPolicy, with_retries
from minichat.processors.merge import OrderedMerge
from minichat.processors.pipeline import Decoded, isolating
from minichat.processors.records import Output, SourceRecord, source_record
from minichat.settings import Settings
from minichat.tools.progress import Progress
from minichat.tools.rebuild.counting import CommandOutcomes, RebuildSummary, RecordId, TurnEventOutcomes
from minichat.tools.rebuild.recorded_order import RecordedOrder

Ranges = Mapping[TopicPartition, tuple[int, int]]
"""[start, end) offsets of each input partition."""


@dataclass
class Rebuild:
    """The worker's handlers, wrapped to count, on the rebuild's one connection."""

    con: asyncpg.Connection
    batches: MergedBatches
    commands: CommandOutcomes
    turn_events: TurnEventOutcomes
    names: TopicNames
    summary: RebuildSummary

    async def apply(self, records: list[SourceRecord]) -> None:
        """One merged batch, as the worker applies it: a refused record is isolated and
        dead-lettered, the rest applied in one transaction (retried whole); then counted."""
        decoded = self.batches.decode(records)
        outputs: list[Output] = []
        outcomes: dict[RecordId, str] = {}

        async def commit(run: Sequence[int]) -> None:
            good = [d for i in run if isinstance(d := decoded[i], Decoded)]

            async def attempt() -> list[Output]:
                self.commands.outcomes = {}
                self.turn_events.outcomes = {}
                async with self.con.transaction():
                    return await self.batches.apply(self.con, good)

            outputs.extend(d for i in run if isinstance(d := decoded[i], Output))
            outputs.extend(await with_retries("replay batch", attempt, RetryPolicy(give_up_after_s=30.0)))
            outcomes.update({**self.commands.outcomes, **self.turn_events.outcomes})

        async def refuse(i: int, exc: BaseException) -> None:  # as the worker does (engine.py)
            outputs.append(self.batches.refused(records[i], exc))

        await isolating(list(range(len(records))), commit, refuse)
        self.summary.count(records, outcomes, self._dead_lettered(outputs))

    def _dead_lettered(self, outputs: Sequence[Output]) -> set[RecordId]:
        """The records these outputs dead-letter; the decisions among them are counted, not sent."""
        dead: set[RecordId] = set()
        for out in outputs:
            if out.topic == self.names.dead_letters:
                letter = json.loads(out.value)
                dead.add((letter["source_topic"], letter["partition"], letter["offset"]))
            elif out.topic == self.names.turn_decisions:
                self.summary.decisions_discarded += 1
        return dead


async def merge_and_apply(
    consumer: AIOKafkaConsumer,
    ranges: Ranges,
    rebuild: Rebuild,
    settings: Settings,
    bar: Progress | None,
    order: RecordedOrder | None = None,
) -> None:
    """Each set's records in the order `order-log` recorded (`recorded_order.py`), then the
    worker's merge, with every partition's frontier at +∞ once it reached its end offset."""
    lanes = {(tp.topic, tp.partition): span for tp, span in ranges.items()}
    order = order if order is not None else RecordedOrder({}, lanes)
    merge = OrderedMerge.of_inputs(rebuild.names)
    active = _open_lanes(consumer, ranges)
    for number in sorted({tp.partition for tp in ranges}):
        if not order.pending(number):
            _open_set(merge, ranges, active, order, number, [])
    while True:
        if active:
            await _fetch(consumer, merge, active, ranges, settings, order)
        released = order.release(settings.batch_max)
        for number, beyond in order.finished():
            _open_set(merge, ranges, active, order, number, beyond)
        if not released:
            released = merge.release(settings.batch_max, settings.batch_max_bytes)
        if released:
            await rebuild.apply(released)
            if bar is not None:
                bar.advance(len(released))
        elif not active and merge.buffered() == 0:
            return


def _open_lanes(consumer: AIOKafkaConsumer, ranges: Ranges) -> set[TopicPartition]:
    """Assign and seek every partition with records to read; returns them."""
    active = {tp for tp, (start, end) in ranges.items() if start < end}
    consumer.assign(sorted(active, key=lambda tp: (tp.topic, tp.partition)))
    for tp in active:
        consumer.seek(tp, ranges[tp][0])
    return active


def _open_set(
    merge: OrderedMerge,
    ranges: Ranges,
    active: set[TopicPartition],
    order: RecordedOrder,
    number: int,
    beyond: list[SourceRecord],
) -> None:
    """The merge takes set `number` on where its recorded order ended, with what was fetched past
    it. Each lane's end is known for good: a causal token naming an offset at or past it is met by
    the end (the worker met it so, once it read that lane's end), and the command keeps its merged
    place."""
    for tp in ranges:
        if tp.partition == number:
            merge.open(tp.topic, number, order.ends[(tp.topic, number)])
            merge.end_read(tp.topic, number, ranges[tp][1], math.inf)
            if tp not in active:
                merge.exhausted(tp.topic, number)
    merge.add(beyond)


async def _fetch(
    consumer: AIOKafkaConsumer,
    merge: OrderedMerge,
    active: set[TopicPartition],
    ranges: Ranges,
    settings: Settings,
    order: RecordedOrder,
) -> None:
    """Fetch into the lanes within the worker's bounds (`OrderedEngine._pace`: per lane in records,
    all in bytes), and always the partition a set's next recorded record is on; a partition that
    reached its end offset is paused and its lane exhausted."""
    sizes = {tp: merge.buffered_of(tp.topic, tp.partition) for tp in active}
    total = sum(size_bytes for _, size_bytes in sizes.values())
    counts = {tp: size + order.buffered_of((tp.topic, tp.partition)) for tp, (size, _) in sizes.items()}
    wanted = [
        tp
        for tp, count in counts.items()
        if order.wants((tp.topic, tp.partition))
        or (count < settings.lane_buffer_max and (count == 0 or total < settings.input_buffer_max_bytes))
    ]
    if not wanted:
        return
    fetched = await consumer.getmany(*wanted, timeout_ms=200, max_records=settings.batch_max)
    for tp, records in fetched.items():
        end = ranges[tp][1]
        merge.add(r for r in map(source_record, records) if r.offset < end and not order.add(r))
    for tp in wanted:
        if await consumer.position(tp) >= ranges[tp][1]:
            active.discard(tp)
            consumer.pause(tp)
            merge.exhausted(tp.topic, tp.partition)
