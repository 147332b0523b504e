"""When an empty input partition is known caught up (its lane's frontier, `merge.py`), at the
least cost in round trips and in waiting.

A record at timestamp T held back by an empty lane goes once that lane is known to hold nothing
older: a look at the partition's end made at wall time S, finding it fetched to its end, sets the
frontier to S - `order_grace_ms` (the grace covers clock skew and replication), which must pass T.
Two looks serve, cheapest first:

- **the fetch responses** (free): every fetch response carries each partition's high watermark,
  and aiokafka keeps one fetch in flight per broker, so a partition's latest response answers a
  request sent after its previous response was processed. A lane fetched to the latest response's
  high watermark is caught up as of the previous response's time (`last_poll_timestamp`).
- **ListOffsets** (one round trip on a connection of its own), only once it can help: sent at S, it
  lets a record at T go only if S - grace > T, so it is sent when that holds, and the engine sleeps
  until then rather than asking every few milliseconds. A held command's causal token needs an end
  offset read after the command arrived (`merge.end_read`): that one is asked for at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from minichat.processors.merge import LaneKey, OrderedMerge

logger = logging.getLogger("minichat.processors.engine")

RETRY_WAIT_S = 0.005
"""After an end offsets request that released nothing (records on their way to the fetcher), wait
this long for them before asking again."""
IDLE_WAIT_S = 1.0
"""The engine's loop with nothing to apply and nothing held back sleeps until records arrive, or
this long."""


class Frontiers:
    """Per lane, the fetch responses' poll times seen so far; sets the merge's frontiers."""

    def __init__(self, merge: OrderedMerge, grace_ms: int) -> None:
        self.merge = merge
        self.grace_ms = grace_ms
        self._polls: dict[LaneKey, tuple[int, int | None]] = {}
        """lane -> (the latest response's poll time seen, an earlier response's)."""

    def observe(self, consumer: AIOKafkaConsumer, lanes: Collection[LaneKey]) -> None:
        """Note the poll times of `lanes` now (the fetch task calls it as responses come for the
        empty lanes: the closer together the looks, the later the previous response it knows)."""
        assigned = consumer.assignment()
        for lane in lanes:
            tp = TopicPartition(*lane)
            if tp in assigned:
                self._note(lane, consumer.last_poll_timestamp(tp))

    def from_fetches(self, consumer: AIOKafkaConsumer, lanes: Collection[LaneKey]) -> None:
        """Move the frontiers of `lanes` as far as the fetch responses show (no I/O, no await)."""
        assigned = consumer.assignment()
        for lane in lanes:
            tp = TopicPartition(*lane)
            if tp not in assigned:
                continue
            end: int | None = consumer.highwater(tp)
            earlier = self._note(lane, consumer.last_poll_timestamp(tp))
            if earlier is not None and end is not None and self.merge.next_offset(*lane) >= end:
                self.merge.caught_up(*lane, earlier - self.grace_ms)

    def _note(self, lane: LaneKey, seen: int | None) -> int | None:
        """Record the lane's latest poll time; return the one before it (None: not known)."""
        if seen is None:
            return None
        latest, earlier = self._polls.get(lane, (None, None))
        if seen != latest:
            earlier = latest
            self._polls[lane] = (seen, earlier)
        return earlier

    def due(self, blocking: Mapping[LaneKey, float]) -> tuple[list[LaneKey], float]:
        """(lanes whose end offsets, asked for now, can release a record; seconds until the next
        lane will be, `math.inf` if none)."""
        now_ms = time.time() * 1000.0
        ready, wait_ms = [], math.inf
        for lane, until_ms in sorted(blocking.items()):
            if now_ms - self.grace_ms > until_ms:
                ready.append(lane)
            else:
                wait_ms = min(wait_ms, until_ms + self.grace_ms - now_ms)
        return ready, wait_ms / 1000.0

    async def refresh(
        self,
        consumer: AIOKafkaConsumer,
        offsets: AIOKafkaConsumer,
        lanes: list[LaneKey],
        assigned: Collection[LaneKey],
        current: Callable[[], int],
    ) -> None:
        """Ask the broker for the end offsets of `lanes`; a lane already fetched to its end gets the
        request's send time (less the grace) as its frontier. Every await is followed by a
        generation check (`current`): a lane re-sought meanwhile must not inherit a frontier its
        new position does not justify."""
        generation = current()
        tick, sent_ms = self.merge.tick(), time.time() * 1000.0
        try:
            ends = await offsets.end_offsets([TopicPartition(*lane) for lane in lanes])
            fetched = {tp: await consumer.position(tp) for tp in ends}
        except KafkaError as exc:  # IllegalStateError in a rebalance, or the broker away
            logger.info("end offsets not available (%s); fetching on", type(exc).__name__)
            return
        if generation != current():
            return
        for tp, end in ends.items():
            lane = (tp.topic, tp.partition)
            if lane in assigned:
                self.merge.end_read(tp.topic, tp.partition, end, tick)  # for causal tokens
            if lane in assigned and self.merge.next_offset(*lane) >= end and fetched[tp] >= end:
                self.merge.caught_up(tp.topic, tp.partition, sent_ms - self.grace_ms)


class Pause:
    """A sleep that `wake` ends at once, resuming the sleeper in the loop's next iteration (an
    `asyncio.Event` behind `wait_for` takes three): the fetch task's pacing while a batch applies,
    ended as the batch ends so that what arrived meanwhile joins the next release."""

    def __init__(self) -> None:
        self._sleeping: asyncio.Future[None] | None = None

    async def wait(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        sleeping = self._sleeping = loop.create_future()
        timer = loop.call_later(seconds, self.wake)
        try:
            await sleeping
        finally:
            timer.cancel()
            self._sleeping = None

    def wake(self) -> None:
        if self._sleeping is not None and not self._sleeping.done():
            self._sleeping.set_result(None)
