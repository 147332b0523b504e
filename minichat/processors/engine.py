"""The ordered engine: the worker's input path, driven with aiokafka inside the faust app.

Why not faust's agents: they consume each topic on its own (so `turn-requests` ran ahead of the
facts of the same chat), assign topic-partitions round-robin (a chat's three partitions could sit
on three workers), and commit offsets themselves, which can skip records after a rebalance
(docs/architecture.md has the source lines). Here one consumer per worker owns partition numbers
(`assignor.py`), merges the three partitions of each number into one ordered stream (`merge.py`),
and applies merged batches in one transaction each, writing the next offset of every partition it
consumed in that same transaction (`storage/coordination.py`). Kafka's committed offsets follow, for
monitoring; they never decide where a worker resumes past the stored positions.

```
on assign(numbers):  seek every (topic, p) to min(stored, acknowledged); commit that if Kafka's is behind
fetch task:          merge.add(fetched records) as soon as they come     # never waits for a batch
loop:
    for each empty partition holding back a record: frontier from the fetch responses, else
        ListOffsets once it can help (frontier = sent time − grace; `frontier.py`)
    batch = merge.release(batch_max)
    transaction: claim positions, apply(batch), store positions      # one unit
    produce outputs; when acknowledged, commit Kafka offsets         # off the critical path
```
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from minichat.models.topics import TopicNames
from minichat.processors.batches import MergedBatches, UserKey
from minichat.processors.causal import counter
from minichat.processors.clients import input_consumer, offsets_client, output_producer
from minichat.processors.errors import Action, RetryPolicy, classify, with_retries
from minichat.processors.flights import Flights
from minichat.processors.frontier import IDLE_WAIT_S, RETRY_WAIT_S, Frontiers, Pause
from minichat.processors.merge import LaneKey, OrderedMerge
from minichat.processors.order_log import OrderRecorder
from minichat.processors.pacing import pacing
from minichat.processors.pipeline import Decoded, isolating
from minichat.processors.progress import ProgressReport
from minichat.processors.records import Output, SourceRecord, source_record
from minichat.processors.resume import ahead_of_group, apply_nothing, next_offsets, resume_at
from minichat.processors.stages import StageClock
from minichat.settings import Settings
from minichat.storage import coordination, statements
from minichat.storage.coordination import PositionConflict
from minichat.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

RESUMED = "engine resumed:"
"""Logged once a rebalance handed this worker its partitions and they resumed (tests wait on it)."""
STALL_REPORT_S = 10.0

FETCH_PACE_S = 0.01
"""While a batch is applied, the fetch task takes records at most this often. Each take lets
aiokafka send the next fetch, and at low rates a fetch per arriving record cost more CPU (about 0.6
ms each) than it could win: what arrives during a batch waits for the batch in hand anyway."""

FAULT_EXIT = 86
"""Exit status of `fault_exit_after_commit` (tests only)."""


class OrderedEngine:
    """Owns the worker's input partitions; `run` until `stop`."""

    def __init__(
        self,
        settings: Settings,
        batches: MergedBatches,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        on_fatal: Callable[[str, BaseException], None],
    ) -> None:
        self.settings = settings
        self.names = TopicNames(settings.topic_prefix)
        self.topics = [self.names.turn_requests, self.names.provider_responses, self.names.usage]
        self.batches = batches
        self.pool = pool
        self.on_fatal = on_fatal
        self.retry = RetryPolicy.from_settings(settings)
        self.merge = OrderedMerge.of_inputs(self.names, counter(batches.metrics, batches.label))
        self._recorded = OrderRecorder(self.names.prefix)  # each transaction's applied order, kept
        self.positions: dict[LaneKey, int | None] = {}
        """What the database says (or this worker last wrote) for each owned partition."""
        self.assigned: set[LaneKey] = set()
        self.paused: set[LaneKey] = set()
        self._generation = 0
        self._unit = asyncio.Lock()  # a batch, or a rebalance step: never both
        self._flights = Flights(
            lambda: self._producer, batches.metrics, self.retry, on_fatal, landed=lambda: self._arrived.set()
        )
        self._stages = StageClock(batches.metrics, self.names.turn_requests)
        self._frontiers = Frontiers(self.merge, settings.order_grace_ms)
        self._released_ms = 0.0
        self._acknowledged_group = coordination.acknowledged_group(settings.group_id)
        self._stopping = False
        self._blocking: dict[LaneKey, float] = {}
        self._progress = ProgressReport(batches.metrics)
        self._stall_reported = 0.0
        self._consumer: AIOKafkaConsumer | None = None
        self._started = False
        self._offsets: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._fetching: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        """Set while no batch is being applied: the fetch task then takes records at once."""
        self._idle.set()
        self._fetch_pause = Pause()

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        consumer = self._consumer = input_consumer(self.settings)
        offsets = self._offsets = offsets_client(self.settings)
        producer = self._producer = output_producer(self.settings)
        consumer.subscribe(self.topics, listener=_Listener(self))
        async with contextlib.AsyncExitStack() as stack:
            for client in (producer, offsets):
                await client.start()
                stack.push_async_callback(client.stop)
            await consumer.start()
            stack.push_async_callback(consumer.stop)
            self._started = True
            self._fetching = asyncio.create_task(self._fetch(consumer), name="engine fetch")
            try:
                while not self._stopping:
                    await self._step(consumer)
            finally:
                await cancel_and_wait(self._fetching)
            async with self._unit:
                await self._flights.land_all(consumer, self.assigned)
                await self._transaction({}, apply_nothing)  # what was acknowledged (see `_seek`)

    def stop(self) -> None:
        self._stopping = True
        self._arrived.set()  # the loop may be sleeping: let it see

    def lag(self) -> dict[tuple[str, int], int]:
        """Per owned input partition: records in the log not applied yet (the end offset the last
        fetch saw, less the stored position); what `/metrics` shows as `minichat_consumer_lag`."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[tuple[str, int], int] = {}
        for lane in sorted(self.assigned):
            end = consumer.highwater(TopicPartition(*lane))
            if end is None:
                continue
            position = self.positions.get(lane)
            out[(self.batches.label(lane[0]), lane[1])] = max(0, end - (position or 0))
        return out

    def not_ready(self) -> str | None:
        """Why `/ready` answers 503: None once the consumer is in the group (owning partitions,
        or waiting for them while the group rebalances) and until the worker stops."""
        if self._stopping:
            return "stopping"
        if not self._started:
            return "starting: not in the consumer group yet"
        return None

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ----------------------------------------------------------------------------------- loop

    async def _fetch(self, consumer: AIOKafkaConsumer) -> None:
        """Hand fetched records to their lanes as soon as the fetcher has them. aiokafka sends a
        broker no new fetch while records it fetched from it wait unconsumed (up to its 100 ms
        prefetch backoff): taken only between batches, a record waited one to two batches before
        the worker even saw it (measured: 87 ms median at 100 requests/s)."""
        while not self._stopping:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=self.settings.batch_max)
            # Every returned record goes to its lane, even across a rebalance: aiokafka returns
            # only records at a partition's current position (a seek drops what it made stale) and
            # moves the position past them, so dropping one here would skip it. A closed lane
            # ignores them; a lane re-opened at its seek position takes them in order.
            for records in fetched.values():
                chunk = [source_record(r) for r in records]
                self._stages.fetched(chunk)
                self.merge.add(chunk)
            if fetched:
                self._frontiers.observe(consumer, self.merge.empty_lanes())
                self._pace(consumer)
                self._arrived.set()
            if not self._idle.is_set():
                await self._fetch_pause.wait(FETCH_PACE_S)

    async def _step(self, consumer: AIOKafkaConsumer) -> None:
        if self._fetching is not None and self._fetching.done():
            self._fetching.result()  # the fetch task failed: fail the engine with its error
        blocking = self.merge.blocking()
        if blocking:
            self._frontiers.from_fetches(consumer, blocking)
            blocking = self.merge.blocking()
        due, next_due_s = self._frontiers.due(blocking)
        if due and self._offsets is not None:
            await self._frontiers.refresh(
                consumer, self._offsets, due, self.assigned, lambda: self._generation
            )
        blocked = sorted(blocking)
        self._report_stall(blocked)
        self._progress.maybe_log()
        await self._flights.commit_deferred(consumer, self.assigned)
        self._arrived.clear()
        # A rebalance (it re-opens every lane) voids what this step takes out from here on.
        generation = self._generation
        released = self.merge.release(self.settings.batch_max, self.settings.batch_max_bytes)
        self._pace(consumer)  # resumes the partitions whose lanes this release drained
        if released:
            now_ms = self._released_ms = self._stages.released(released)
            self.batches.metrics.observe(
                "minichat_record_wait_seconds", ((now_ms - r.timestamp_ms) / 1000.0 for r in released)
            )
            while len(self._flights) >= self.settings.produce_in_flight:
                await self._flights.land_one(consumer, self.assigned)
            async with self._unit:
                if generation != self._generation:
                    return
                self._idle.clear()
                try:
                    await self._apply(consumer, released)
                finally:
                    self._idle.set()
                    self._fetch_pause.wake()
            # The fetch task takes what arrived during the batch before the next release.
            await asyncio.sleep(0)
        else:
            # Nothing to apply: wait for records, or (a set held back by an empty lane) until its
            # end offsets can release something (`frontier.py`).
            wait = min(RETRY_WAIT_S if due else IDLE_WAIT_S, max(next_due_s, 0.0005))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait)
        await self._flights.land_finished(consumer, self.assigned)
        if self._flights.unrecorded:  # acknowledgements no Kafka commit holds: keep them now
            async with self._unit:
                self._flights.unrecorded = False
                await self._transaction({}, apply_nothing)

    def _report_stall(self, blocked: Sequence[LaneKey]) -> None:
        """A lane that holds its set back for long neither delivers nor catches up (the broker is
        away, or the partition lost its leader): say which, every `STALL_REPORT_S`."""
        now = time.monotonic()
        self._blocking = {lane: self._blocking.get(lane, now) for lane in blocked}
        stuck = sorted(lane for lane, since in self._blocking.items() if now - since >= STALL_REPORT_S)
        if stuck and now - self._stall_reported >= STALL_REPORT_S:
            self._stall_reported = now
            lanes = ", ".join(f"{t}[{p}]@{self.merge.next_offset(t, p)}" for t, p in stuck)
            logger.warning("records held back for %.0f s or more, waiting for: %s", STALL_REPORT_S, lanes)

    def _pace(self, consumer: AIOKafkaConsumer) -> None:
        """Pause and resume the partitions as `pacing` says of the lanes now."""
        lanes = {lane: self.merge.buffered_of(*lane) for lane in self.merge.lanes()}
        pause, resume = pacing(
            lanes, self.paused, self.settings.lane_buffer_max, self.settings.input_buffer_max_bytes
        )
        for lane in pause:
            consumer.pause(TopicPartition(*lane))
            self.paused.add(lane)
        for lane in resume:
            consumer.resume(TopicPartition(*lane))
            self.paused.discard(lane)

    async def _apply(self, consumer: AIOKafkaConsumer, records: list[SourceRecord]) -> None:
        """Apply released records; a record PostgreSQL refuses is isolated and dead-lettered
        (`unprocessable`), the others are applied around it."""
        decoded = self.batches.decode(records)
        try:
            await isolating(
                list(range(len(records))),
                lambda run: self._commit(records, decoded, run),
                lambda i, exc: self._refuse(records[i], exc),
            )
        except PositionConflict as conflict:
            # Every lane of every set the batch took records from is past them in memory and at
            # the consumer, whichever rows moved: all of them are dropped and re-read.
            sets = sorted({r.partition for r in records})
            logger.warning("%s; re-reading partition sets %s from the stored positions", conflict, sets)
            await self._reseek(consumer, [(topic, p) for p in sets for topic in self.topics])

    async def _commit(
        self, records: list[SourceRecord], decoded: list[Decoded[Any] | Output], run: Sequence[int]
    ) -> None:
        """One transaction: claim the positions, apply the records of `run`, store the positions
        after them; then their outputs leave (a flight)."""
        good = [d for i in run if isinstance(d := decoded[i], Decoded)]
        dead = [d for i in run if isinstance(d := decoded[i], Output)]
        offsets = next_offsets(records[i] for i in run)
        began, sent = time.monotonic(), statements.count_statements()
        commands = [records[i].timestamp_ms for i in run if records[i].topic == self.names.turn_requests]
        self._stages.batch("assembly", time.time() - self._released_ms / 1000.0, len(commands))
        groups, owners = await self._split(good)
        if len(groups) > 1:
            outputs = await self._apply_groups(offsets, groups, owners)
            dead_records = [records[i] for i in run if isinstance(decoded[i], Output)]
            try:  # the positions (and the dead letters' order), once every group committed
                await self._transaction(offsets, self._recorded(apply_nothing, dead_records))
            except PositionConflict:
                self._flights.send(outputs, {}, [])  # committed: their decisions leave all the same
                raise
        else:
            apply = self._recorded(
                functools.partial(self.batches.apply, good=good), [records[i] for i in run]
            )
            outputs = await self._transaction(offsets, apply)
        if self.settings.fault_exit_after_commit and any(
            d.record.topic == self.names.turn_requests for d in good
        ):
            logger.critical("fault injection: exiting after a commit, before its outputs are sent")
            os._exit(FAULT_EXIT)
        took = time.monotonic() - began
        self.batches.metrics.observe("minichat_batch_seconds", (took,), stage="transaction")
        self._stages.batch("transaction", took, len(commands))
        self.batches.count_applied(good, len(dead), statements=sent.sent)
        self._flights.send(dead + outputs, offsets, commands)

    async def _split(self, good: list[Decoded[Any]]) -> tuple[list[list[Decoded[Any]]], dict[UUID, UserKey]]:
        """The batch as groups that share no chat and no user (one group: not split), and the
        chats' owners the grouping read (the groups' transactions use them instead of reading
        them again)."""
        parts = self.settings.apply_parallel
        if parts < 2 or len(good) < self.settings.apply_parallel_min:
            return [good], {}

        async def read() -> dict[UUID, UserKey]:
            pool = await self.pool()
            async with pool.acquire() as con:
                return await self.batches.owners(con, good)

        owners = await with_retries(
            "engine split", read, self.retry, dependency="PostgreSQL", on_retry=self._count_retry
        )
        groups = self.batches.split(good, owners, parts)
        if len(groups) > 1:
            self.batches.metrics.inc("minichat_batch_groups_total", len(groups))
        return groups, owners

    async def _apply_groups(
        self, offsets: dict[LaneKey, int], groups: list[list[Decoded[Any]]], owners: dict[UUID, UserKey]
    ) -> list[Output]:
        """Each group in its own transaction, all at once: while one waits for PostgreSQL the
        others' Python runs. They claim the positions shared and store none; a crash before the
        positions are stored re-applies the batch, as a crash before any commit would (what
        committed is a no-op the second time, its decisions re-sent as replays). A record
        PostgreSQL refuses fails its group, and the whole run goes back to `isolating`. A group
        that committed next to one that met a position conflict sends its decisions: its records
        will not be applied again by this worker."""

        def group(g: list[Decoded[Any]]) -> Awaitable[list[Output]]:
            apply = self._recorded(functools.partial(self.batches.apply, good=g, owners=owners), g)
            return self._transaction(offsets, apply, store=False)

        results = await asyncio.gather(*(group(g) for g in groups), return_exceptions=True)
        outputs = [out for r in results if not isinstance(r, BaseException) for out in r]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            error = next((e for e in failed if classify(e) is not Action.ISOLATE), failed[0])
            if isinstance(error, PositionConflict) and outputs:
                self._flights.send(outputs, {}, [])
            raise error
        return outputs

    async def _refuse(self, record: SourceRecord, exc: BaseException) -> None:
        """Move the positions past a record the database refused; its dead letter says why."""
        logger.warning(
            "%s[%d]@%d refused by PostgreSQL (%s); dead-lettered as unprocessable",
            record.topic,
            record.partition,
            record.offset,
            type(exc).__name__,
        )
        offsets = next_offsets((record,))
        await self._transaction(offsets, self._recorded(apply_nothing, [record]))
        self.batches.metrics.inc("minichat_records_refused_total", topic=self.batches.label(record.topic))
        self.batches.count_applied((), 1)
        self._flights.send([self.batches.refused(record, exc)], offsets, [])

    async def _transaction(
        self,
        offsets: dict[LaneKey, int],
        apply: Callable[[asyncpg.Connection], Awaitable[list[Output]]],
        *,
        store: bool = True,
    ) -> list[Output]:
        """Claim the positions, apply, store the positions after `offsets`: one unit. Without `store`
        (a split batch's group) the claim is shared, nothing stored. The claim is the transaction's
        first statement; the store goes with `apply`'s first write (`storage/combined.py`)."""
        expected = {lane: self.positions.get(lane) for lane in offsets}
        acknowledged = dict(self._flights.acknowledged)  # outputs acknowledged: kept with the positions

        async def attempt() -> list[Output]:
            pool = await self.pool()
            group = self.settings.group_id
            stored = coordination.positions_part(group, offsets, acknowledged) if store else None
            async with pool.acquire() as con, con.transaction():
                return await coordination.framed(con, apply, group, expected, stored, shared=not store)

        outputs = await with_retries(
            "engine batch", attempt, self.retry, dependency="PostgreSQL", on_retry=self._count_retry
        )
        if not store:
            return outputs
        self._flights.forget_acknowledged(acknowledged)
        for lane, next_offset in offsets.items():
            previous = self.positions.get(lane)
            self.positions[lane] = next_offset if previous is None else max(previous, next_offset)
        return outputs

    def _count_retry(self, exc: BaseException) -> None:
        self.batches.metrics.inc("minichat_batch_retries_total", error=type(exc).__name__)

    # ---------------------------------------------------------------------------- rebalance

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._unit:
            self._generation += 1
            await self._flights.await_all()
            for tp in revoked:
                lane = (tp.topic, tp.partition)
                self.merge.close(*lane)
                self.assigned.discard(lane)
                self.positions.pop(lane, None)
                self.paused.discard(lane)

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        async with self._unit:
            self._generation += 1
            lanes = [(tp.topic, tp.partition) for tp in assigned]
            self.assigned.update(lanes)
            for topic in {topic for topic, _ in lanes}:  # what `wrong_partition` is checked against
                if found := consumer.partitions_for_topic(topic):
                    self.batches.placement.partitions[topic] = len(found)
            await self._seek(consumer, lanes)
            numbers = sorted({p for _, p in lanes})
            logger.info("%s %d input partition(s), partition sets %s", RESUMED, len(lanes), numbers)

    async def _reseek(self, consumer: AIOKafkaConsumer, lanes: list[LaneKey]) -> None:
        self._generation += 1
        await self._flights.await_all()
        await self._seek(consumer, [lane for lane in lanes if lane in self.assigned])

    async def _seek(self, consumer: AIOKafkaConsumer, lanes: list[LaneKey]) -> None:
        """Resume each partition at its stored position (`resume.resume_offset`), after making the
        position rows that do not exist yet, so that every later claim has a row to lock."""
        if not lanes:
            return
        tps = [TopicPartition(*lane) for lane in lanes]
        beginnings = await consumer.beginning_offsets(tps)
        first = {lane: beginnings[tp] for lane, tp in zip(lanes, tps, strict=True)}

        async def load() -> tuple[dict[LaneKey, int], dict[LaneKey, int]]:
            pool = await self.pool()
            async with pool.acquire() as con:
                acked = await coordination.load_positions(con, self._acknowledged_group, lanes)
                return await coordination.prepare_positions(con, self.settings.group_id, first), acked

        stored, acked = await with_retries("load positions", load, self.retry, dependency="PostgreSQL")
        kafka = {tp: await consumer.committed(tp) for tp in tps}
        starts: dict[TopicPartition, int] = {}
        # Every lane opens in one go, with no await in between: a partition set whose other lanes
        # are not open yet would release its records as if those lanes were empty.
        for lane, tp in zip(lanes, tps, strict=True):
            position = stored.get(lane, beginnings[tp])
            start, done = resume_at(position, kafka[tp], acked.get(lane), beginnings[tp])
            consumer.seek(tp, starts.setdefault(tp, start))
            self.positions[lane] = stored.get(lane)
            self.merge.open(tp.topic, tp.partition, start)
            self._stages.reopened(lane)
            if lane in self.paused:
                consumer.resume(tp)
                self.paused.discard(lane)
            where = f"stored {position}, committed {kafka[tp]}, acknowledged {done}"
            logger.info("%s[%d]: resuming at %d (%s)", *lane, start, where)
        self._generation += 1  # what a step took out of the lanes before they opened is void
        self._flights.commit_later(ahead_of_group(starts, kafka))  # else an idle partition lags for ever


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: OrderedEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.engine.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.engine.on_assigned(assigned)
