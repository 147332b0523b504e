"""When an empty lane counts as caught up: from fetch responses, and when ListOffsets can help."""

from __future__ import annotations

import asyncio
import math
import time

from aiokafka import TopicPartition

from minichat.processors.frontier import Frontiers, Pause
from minichat.processors.merge import OrderedMerge
from minichat.processors.records import SourceRecord, timestamp_from_ms

RANKS = {"pr": 0, "us": 1, "tr": 2}


def rec(topic: str, partition: int, offset: int, ms: int) -> SourceRecord:
    return SourceRecord(topic, partition, offset, b"k", b"{}", timestamp_from_ms(ms))


def opened() -> OrderedMerge:
    merge = OrderedMerge(RANKS)
    for topic in RANKS:
        merge.open(topic, 0, 0)
    return merge


class Polls:
    """What the engine reads of aiokafka's consumer: each partition's last fetch response."""

    def __init__(self) -> None:
        self.seen: dict[TopicPartition, tuple[int, int]] = {}  # (poll time ms, high watermark)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t, 0) for t in RANKS}

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.seen[tp][0] if tp in self.seen else None

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.seen[tp][1] if tp in self.seen else None


def test_blocking_names_the_timestamp_each_empty_lane_must_pass() -> None:
    merge = opened()
    merge.add([rec("tr", 0, 0, 1000), rec("pr", 0, 0, 1200)])
    assert merge.blocking() == {("us", 0): 1000}
    assert merge.blocked_lanes() == [("us", 0)]


def test_a_fetch_response_counts_as_of_the_previous_response_only() -> None:
    merge = opened()
    merge.add([rec("tr", 0, 0, 1000)])
    frontiers, polls = Frontiers(merge, grace_ms=5), Polls()
    for topic in ("pr", "us"):
        polls.seen[TopicPartition(topic, 0)] = (1100, 0)
    frontiers.from_fetches(polls, merge.blocking())  # type: ignore[arg-type]
    assert merge.release(10) == []  # the first response seen proves nothing: its request's time is unknown
    for topic in ("pr", "us"):
        polls.seen[TopicPartition(topic, 0)] = (1110, 0)
    frontiers.from_fetches(polls, merge.blocking())  # type: ignore[arg-type]
    assert [r.offset for r in merge.release(10)] == [0]  # caught up as of 1100 - 5 > 1000


def test_a_fetch_response_with_records_not_handed_to_the_lane_moves_nothing() -> None:
    merge = opened()
    merge.add([rec("tr", 0, 0, 1000)])
    frontiers, polls = Frontiers(merge, grace_ms=5), Polls()
    polls.seen[TopicPartition("us", 0)] = (1100, 0)
    polls.seen[TopicPartition("pr", 0)] = (1100, 1)
    frontiers.from_fetches(polls, merge.blocking())  # type: ignore[arg-type]
    polls.seen[TopicPartition("us", 0)] = (1110, 0)
    polls.seen[TopicPartition("pr", 0)] = (1110, 1)  # pr[0]@0 exists, not fetched yet
    frontiers.from_fetches(polls, merge.blocking())  # type: ignore[arg-type]
    assert merge.release(10) == []
    assert merge.blocking() == {("pr", 0): 1000}


def test_end_offsets_are_due_once_the_grace_has_passed_the_held_record() -> None:
    merge = opened()
    frontiers = Frontiers(merge, grace_ms=5)
    now = time.time() * 1000.0
    due, wait_s = frontiers.due({("pr", 0): now + 20, ("us", 0): now - 10, ("tr", 0): -math.inf})
    assert due == [("tr", 0), ("us", 0)]
    assert 0.015 < wait_s <= 0.025
    assert frontiers.due({}) == ([], math.inf)


def test_a_pause_ends_when_woken_or_after_its_time() -> None:
    async def scenario() -> tuple[float, float]:
        pause = Pause()
        began = time.monotonic()
        sleeper = asyncio.ensure_future(pause.wait(5.0))
        await asyncio.sleep(0)
        pause.wake()
        await sleeper
        woken = time.monotonic() - began
        began = time.monotonic()
        await pause.wait(0.01)
        return woken, time.monotonic() - began

    woken, slept = asyncio.run(scenario())
    assert woken < 1.0
    assert slept >= 0.009
