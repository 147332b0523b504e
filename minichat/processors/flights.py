"""Committed batches whose outputs are on their way to Kafka (the engine's output side).

A batch's outputs leave after its transaction committed; the engine goes on with the next batch
meanwhile. Once a batch's outputs are acknowledged, its input offsets are committed to Kafka, in
batch order: for monitoring, and as the lower bound a re-assigned partition resumes from
(`min(stored, committed)`), so that outputs lost in a crash between commit and produce are re-sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from minichat.processors.errors import RetryPolicy, with_retries
from minichat.processors.merge import LaneKey
from minichat.processors.metrics import Metrics
from minichat.processors.pipeline import send_all
from minichat.processors.records import Output
from minichat.processors.stages import STAGE_SECONDS

logger = logging.getLogger(__name__)

DEFERRED_COMMIT_S = 5.0
"""How long the engine's loop waits for a deferred offset commit before trying again later."""


@dataclass
class _Flight:
    outputs: list[Output]
    offsets: dict[LaneKey, int]
    done: asyncio.Task[None]


class Flights:
    """Batches whose outputs are being produced, oldest first."""

    def __init__(
        self,
        producer: Callable[[], AIOKafkaProducer | None],
        metrics: Metrics,
        retry: RetryPolicy,
        on_fatal: Callable[[str, BaseException], None],
        landed: Callable[[], None] | None = None,
    ) -> None:
        """`landed`: called as each batch's outputs are acknowledged (the engine's loop then
        commits their offsets)."""
        self._producer = producer
        self._metrics = metrics
        self._retry = retry
        self._on_fatal = on_fatal
        self._landed = landed
        self._flights: deque[_Flight] = deque()
        self._to_commit: dict[TopicPartition, int] = {}
        self._committing: asyncio.Task[None] | None = None
        self._commits_failing = False
        self._deferred: dict[TopicPartition, int] = {}
        self.revoke_wait_s = DEFERRED_COMMIT_S
        """How long a rebalance waits for the commit under way (`await_all`)."""
        self.acknowledged: dict[LaneKey, int] = {}
        """Next offsets whose batches' outputs were all acknowledged, not yet kept in PostgreSQL."""
        self.unrecorded = False
        """Some of `acknowledged` are in no Kafka commit either (refused, or not sent in a
        rebalance): the engine keeps them in PostgreSQL at once rather than with its next batch.
        A worker evicted from the group (a zombie) applies batches until it notices; with their
        acknowledgements kept nowhere, the partitions' next owner would re-send their outputs."""

    def __len__(self) -> int:
        return len(self._flights)

    def send(self, outputs: list[Output], offsets: dict[LaneKey, int], commands_ms: list[int]) -> None:
        """Start producing a committed batch's outputs; `offsets`: its next input offsets."""
        delivery = asyncio.ensure_future(self._deliver(outputs, commands_ms))
        if self._landed is not None:
            landed = self._landed
            delivery.add_done_callback(lambda _: landed())
        self._flights.append(_Flight(outputs, offsets, delivery))

    async def _deliver(self, outputs: list[Output], commands_ms: list[int]) -> None:
        """`commands_ms`: the timestamps of the batch's commands, whose decisions count as
        delivered once every output is acknowledged."""
        if not outputs:
            return
        began = time.monotonic()
        acked: set[int] = set()
        producer = self._producer()
        assert producer is not None, "outputs exist only while the engine runs"
        await with_retries(
            "engine produce", lambda: send_all(producer, outputs, acked), self._retry, dependency="Kafka"
        )
        took = time.monotonic() - began
        self._metrics.observe("minichat_batch_seconds", (took,), stage="produce")
        self._metrics.observe_times(STAGE_SECONDS, took, len(commands_ms), stage="produce")
        now_ms = time.time() * 1000.0
        self._metrics.observe("minichat_decision_seconds", ((now_ms - ms) / 1000.0 for ms in commands_ms))

    async def land_finished(self, consumer: AIOKafkaConsumer, owned: Container[LaneKey]) -> None:
        """Land the batches already acknowledged (no wait: their commits go on in the background)."""
        if self._committing is not None and self._committing.done():
            self._committing.result()  # a commit that failed for another reason than Kafka's
        while self._flights and self._flights[0].done.done():
            await self.land_one(consumer, owned)

    async def land_all(self, consumer: AIOKafkaConsumer, owned: Container[LaneKey]) -> None:
        while self._flights:
            await self.land_one(consumer, owned)
        await self.settle()

    async def land_one(self, consumer: AIOKafkaConsumer, owned: Container[LaneKey]) -> None:
        """Wait for the oldest batch's acknowledgements, then have its offsets committed to Kafka,
        off the engine's loop: a commit is a round trip to the group coordinator (measured: p50 6,
        p99 30 ms on a busy machine) that no decision waits for. The commits go one at a time,
        each with the highest offsets landed since the last one, of the partitions still `owned`
        when it is sent."""
        flight = self._flights[0]
        await flight.done  # a failure here is fatal: the worker restarts and re-sends
        if not self._flights or self._flights[0] is not flight:
            return  # a rebalance landed it meanwhile
        self._flights.popleft()
        self._acknowledge(flight)
        for lane, n in flight.offsets.items():
            tp = TopicPartition(*lane)
            self._to_commit[tp] = max(n, self._to_commit.get(tp, n))
        if self._to_commit and (self._committing is None or self._committing.done()):
            self._committing = asyncio.ensure_future(self._commit_landed(consumer, owned))

    async def _commit_landed(self, consumer: AIOKafkaConsumer, owned: Container[LaneKey]) -> None:
        while self._to_commit:
            offsets, self._to_commit = self._to_commit, {}
            mine = {tp: n for tp, n in offsets.items() if (tp.topic, tp.partition) in owned}
            if len(mine) < len(offsets) or not await self.commit(consumer, mine):
                self.unrecorded = True

    async def settle(self) -> None:
        """Wait for the commit under way (and those queued behind it)."""
        if self._committing is not None:
            await self._committing

    async def commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
        """Commit the next offsets `offsets` to the group; a failure is counted, never fatal.
        Returns whether the group took them."""
        if not offsets:
            return True
        try:
            await consumer.commit({tp: OffsetAndMetadata(n, "") for tp, n in offsets.items()})
        except KafkaError as exc:  # the stored positions are the truth: nothing is lost
            self._commit_failed(exc)
            return False
        if self._commits_failing:
            logger.info("Kafka offset commits succeed again")
        self._commits_failing = False
        return True

    def _commit_failed(self, exc: KafkaError) -> None:
        """Counted every time, said once per streak: commits that keep failing let the group's
        offsets expire (the worker then resumes at its stored positions, but lag monitoring that
        reads the group's offsets goes blind)."""
        self._metrics.inc("minichat_offset_commit_failures_total", error=type(exc).__name__)
        if not self._commits_failing:
            name = type(exc).__name__
            logger.warning("Kafka offset commit failed (%s); the stored positions still hold", name)
        self._commits_failing = True

    def commit_later(self, offsets: dict[TopicPartition, int]) -> None:
        """Have `offsets` committed by the engine's loop (`commit_deferred`), not in a rebalance
        callback: aiokafka retries a commit's retriable errors without end, and a callback that
        never returns leaves the worker stuck in the rebalance, deaf to SIGTERM."""
        self._deferred.update(offsets)

    async def commit_deferred(self, consumer: AIOKafkaConsumer, owned: Container[LaneKey]) -> None:
        """The offsets of `commit_later`, at most `DEFERRED_COMMIT_S` (kept for the next step if
        the coordinator does not answer by then)."""
        if not self._deferred:
            return
        offsets, self._deferred = self._deferred, {}
        mine = {tp: n for tp, n in offsets.items() if (tp.topic, tp.partition) in owned}
        try:
            await asyncio.wait_for(self.commit(consumer, mine), DEFERRED_COMMIT_S)
        except TimeoutError:
            self._deferred = {**mine, **self._deferred}

    async def await_all(self) -> None:
        """Every output acknowledged before partitions move (no Kafka commit here: the coordinator
        is rebalancing; the stored positions are what counts)."""
        flights = list(self._flights)
        self._flights.clear()
        self._deferred.clear()  # the next assignment works out its own
        if self._to_commit or flights:
            self.unrecorded = True
        self._to_commit.clear()  # the coordinator is rebalancing: not sent
        await self._drop_commit()
        for flight in flights:
            try:
                await flight.done
            except Exception as exc:  # aiokafka would swallow it in a rebalance callback
                self._on_fatal("engine produce", exc)
            else:
                self._acknowledge(flight)

    async def _drop_commit(self) -> None:
        """The commit under way, waited for at most `DEFERRED_COMMIT_S`, then given up: this runs in
        a rebalance callback, and aiokafka retries a commit's retriable errors without end (a
        callback that never returns leaves the worker stuck in the rebalance, deaf to SIGTERM).
        Giving up loses nothing: the stored positions are the truth, and a request already sent
        carries the old generation, which the coordinator refuses once the group moved on."""
        committing, self._committing = self._committing, None
        if committing is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(committing), self.revoke_wait_s)
        except TimeoutError:
            self.unrecorded = True
            committing.cancel()
            logger.info("Kafka offset commit unanswered in a rebalance; given up (the stored positions hold)")
        except Exception as exc:  # aiokafka would swallow it in a rebalance callback
            self._on_fatal("engine commit", exc)

    def _acknowledge(self, flight: _Flight) -> None:
        for lane, offset in flight.offsets.items():
            self.acknowledged[lane] = max(offset, self.acknowledged.get(lane, offset))

    def forget_acknowledged(self, kept: dict[LaneKey, int]) -> None:
        """`kept` is in PostgreSQL now: drop what it covers."""
        for lane, offset in kept.items():
            if self.acknowledged.get(lane) == offset:
                del self.acknowledged[lane]
