"""The input partitions of one partition number, merged into one ordered stream (pure, no I/O).

Order (docs/contract.md, "Order of processing"): (record timestamp, topic rank, offset), ranks
`provider-responses` 0, `usage` 1, `turn-requests` 2, each partition in offset order. A record is
released only when no earlier record of its partition set can still arrive: every other input
partition of the set either has a buffered record after it, or is known to hold nothing before it
(its *frontier*).

Frontiers come from the outside: the worker sets one when a ListOffsets request sent at wall time T
found the partition fetched to its end (a record appended later carries a LogAppendTime of at least
T, less the configured grace for clock skew and replication), `minichat replay` when a partition
reached the end offset it took at start (+∞). The same class serves both, so a rebuild merges
exactly like the live worker.

A command carrying a causal token (`after`, `causal.py`) is held at the head of its lane until
its set has applied the records it names (or their lane's end, read after it arrived, is not past
them); the records behind it in its lane wait with it, the set's other lanes go on in order.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from minichat.models.topics import TopicNames
from minichat.processors.causal import Met, met, needs_of
from minichat.processors.records import SourceRecord

INPUT_RANKS = ("provider_responses", "usage", "turn_requests")
"""docs/contract.md, "Order of processing": on equal timestamps facts come before commands."""


def input_ranks(names: TopicNames) -> dict[str, int]:
    return {getattr(names, attr): rank for rank, attr in enumerate(INPUT_RANKS)}


LaneKey = tuple[str, int]
"""(topic, partition)"""

OrderKey = tuple[int, int, int, int]
"""(timestamp ms, topic rank, partition, offset): the merged order, total over every input record."""


@dataclass(slots=True)
class _Lane:
    topic: str
    partition: int
    rank: int
    next_offset: int
    """The offset after the last record handed to the lane (what it has been fetched to)."""
    buffer: deque[SourceRecord] = field(default_factory=deque)
    bytes: int = 0
    """Size of the buffered records' keys and values."""
    frontier_ms: float = -math.inf
    """No record the lane has not been handed yet can carry a timestamp below this."""
    waits: dict[int, tuple[dict[str, int], int]] = field(default_factory=dict)
    """Buffered commands' unmet causal tokens ({topic: offset}) by offset, with their arrival tick."""
    end: tuple[int, float] = (0, -math.inf)
    """(end offset, tick of the read): the lane's end offset as last read, and when."""

    def applied_below(self) -> int:
        """Every record of the lane below this offset has been handed out (or preceded the lane)."""
        return self.buffer[0].offset if self.buffer else self.next_offset

    def head_key(self) -> OrderKey:
        record = self.buffer[0]
        return (record.timestamp_ms, self.rank, self.partition, record.offset)

    def precedes(self, key: OrderKey) -> bool:
        """Could a record not yet handed to this (empty) lane come before `key`?"""
        return (self.frontier_ms, self.rank) <= (key[0], key[1])


class OrderedMerge:
    """Lanes of every owned input partition; `release` hands out the records that are safe to
    apply, in merged order. Partition sets (same partition number) are independent of each other."""

    def __init__(
        self,
        ranks: Mapping[str, int],
        needs: Callable[[SourceRecord], Mapping[str, int]] | None = None,
        on_met: Callable[[str, Met], None] | None = None,
    ) -> None:
        """`needs`: a record's causal token as {topic: offset}; `on_met` hears each named offset
        met (topic, how)."""
        self.ranks = dict(ranks)
        self._lanes: dict[LaneKey, _Lane] = {}
        self._sets: dict[int, list[_Lane]] = {}
        self._needs = needs
        self._on_met = on_met
        self._tick = 0

    @classmethod
    def of_inputs(cls, names: TopicNames, on_met: Callable[[str, Met], None] | None = None) -> OrderedMerge:
        """The three input topics, with their commands' causal tokens."""
        return cls(input_ranks(names), needs_of(names), on_met)

    # ------------------------------------------------------------------------------ lanes

    def open(self, topic: str, partition: int, next_offset: int) -> None:
        """Start (or restart, after a seek) the lane of an owned partition, empty."""
        self.close(topic, partition)
        lane = _Lane(topic, partition, self.ranks[topic], next_offset)
        self._lanes[(topic, partition)] = lane
        self._sets.setdefault(partition, []).append(lane)

    def close(self, topic: str, partition: int) -> None:
        lane = self._lanes.pop((topic, partition), None)
        if lane is not None:
            members = self._sets[partition]
            members.remove(lane)
            if not members:
                del self._sets[partition]

    def lanes(self) -> list[LaneKey]:
        return sorted(self._lanes)

    def next_offset(self, topic: str, partition: int) -> int:
        return self._lanes[(topic, partition)].next_offset

    def empty_lanes(self) -> list[LaneKey]:
        return [key for key, lane in self._lanes.items() if not lane.buffer]

    def buffered(self) -> int:
        return sum(len(lane.buffer) for lane in self._lanes.values())

    def buffered_of(self, topic: str, partition: int) -> tuple[int, int]:
        """(records, bytes) buffered in a lane."""
        lane = self._lanes.get((topic, partition))
        return (len(lane.buffer), lane.bytes) if lane is not None else (0, 0)

    # --------------------------------------------------------------------------- feeding

    def add(self, records: Iterable[SourceRecord]) -> None:
        """Records of owned lanes in offset order; records of lanes not open, or already handed
        (a fetch that raced a seek), are ignored."""
        self._tick += 1
        for record in records:
            lane = self._lanes.get((record.topic, record.partition))
            if lane is None or record.offset < lane.next_offset:
                continue
            if self._needs is not None and (need := self._needs(record)):
                lane.waits[record.offset] = (dict(need), self._tick)
            lane.buffer.append(record)
            lane.bytes += _size(record)
            lane.next_offset = record.offset + 1

    def caught_up(self, topic: str, partition: int, as_of_ms: float) -> bool:
        """The caller saw the partition fetched to its end offset as of `as_of_ms` (the wall time
        a ListOffsets request was sent, less the grace), and handed every fetched record to the
        lane: nothing that arrives later can be older. Returns whether the frontier moved."""
        lane = self._lanes.get((topic, partition))
        if lane is None or as_of_ms <= lane.frontier_ms:
            return False
        lane.frontier_ms = as_of_ms
        return True

    def tick(self) -> int:
        """Advances with every `add`: take it before asking for end offsets (`end_read`)."""
        return self._tick

    def end_read(self, topic: str, partition: int, end: int, tick: float) -> None:
        """The lane's end offset, read with a request sent at `tick` (`math.inf`: the end for good,
        as `minichat replay` takes it at start). It releases held commands that arrived by `tick`
        and name an offset at or past it."""
        lane = self._lanes.get((topic, partition))
        if lane is not None and tick >= lane.end[1]:
            lane.end = (end, tick)

    def exhausted(self, topic: str, partition: int) -> None:
        """Nothing more will come (`minichat replay` at its end offset)."""
        lane = self._lanes.get((topic, partition))
        if lane is not None:
            lane.frontier_ms = math.inf

    # ------------------------------------------------------------------------- releasing

    def blocked_lanes(self) -> list[LaneKey]:
        """Empty lanes that hold back a buffered record of their set: the ones worth a
        ListOffsets request (or a fetch) before the next `release`."""
        return sorted(self.blocking())

    def blocking(self) -> dict[LaneKey, float]:
        """`blocked_lanes` with, for each, the timestamp (ms) its frontier must pass to let the
        record it holds back go (`-inf`: a held command waits for its end offset, read after it
        arrived, whenever that is read)."""
        waiting: dict[LaneKey, float] = {}
        for number, members in self._sets.items():
            for lane in members:
                for topic in self._unread(lane):
                    waiting[(topic, number)] = -math.inf
            heads = [lane.head_key() for lane in members if lane.buffer and not self._held(lane)]
            if not heads:
                continue
            first = min(heads)
            for lane in members:
                if not lane.buffer and lane.precedes(first):
                    key = (lane.topic, lane.partition)
                    waiting[key] = min(waiting.get(key, math.inf), first[0])
        return waiting

    def release(self, limit: int, max_bytes: int | None = None) -> list[SourceRecord]:
        """Up to `limit` records (and about `max_bytes`: at least one record, then none that would
        pass it) that no record still to come can precede, in merged order."""
        heap: list[tuple[OrderKey, int]] = []
        held: dict[int, list[_Lane]] = {}
        for number, members in self._sets.items():
            for lane in members:
                if lane.buffer and self._held(lane):
                    held.setdefault(number, []).append(lane)
                elif lane.buffer:
                    heap.append((lane.head_key(), number))
        heapq.heapify(heap)
        released: list[SourceRecord] = []
        size = 0
        blocked: set[int] = set()
        while heap and len(released) < limit:
            key, number = heapq.heappop(heap)
            if number in blocked:
                continue
            members = self._sets[number]
            if len(members) < len(self.ranks) or any(
                not lane.buffer and lane.precedes(key) for lane in members
            ):
                # A set with a lane not open (yet) knows nothing of that partition: hold it back.
                blocked.add(number)
                continue
            lane = self._lanes[(_topic_of(members, key[1]), number)]
            record_size = _size(lane.buffer[0])
            if max_bytes is not None and released and size + record_size > max_bytes:
                break
            released.append(lane.buffer.popleft())
            lane.bytes -= record_size
            size += record_size
            if lane.buffer and self._held(lane):
                held.setdefault(number, []).append(lane)
            elif lane.buffer:
                heapq.heappush(heap, (lane.head_key(), number))
            for waiting in held.get(number, ())[:]:
                if not self._held(waiting):  # what it waited for was just handed out
                    held[number].remove(waiting)
                    heapq.heappush(heap, (waiting.head_key(), number))
        return released

    # ------------------------------------------------------------------------ causal tokens

    def _held(self, lane: _Lane) -> bool:
        """Does the lane's head wait for a record its token names? Offsets met are dropped from
        the token (and heard by `on_met`) as they are found met."""
        wait = lane.waits.get(lane.buffer[0].offset) if lane.waits and lane.buffer else None
        if wait is None:
            return False
        need, arrived = wait
        for topic, offset in list(need.items()):
            other = self._lanes.get((topic, lane.partition))
            if other is None:
                continue  # a lane not open holds the whole set back (`release`)
            end = other.end[0] if other.end[1] >= arrived else None
            how = met(offset, other.applied_below(), end)
            if how is not None:
                del need[topic]
                if self._on_met is not None:
                    self._on_met(topic, how)
        if need:
            return True
        del lane.waits[lane.buffer[0].offset]
        return False

    def _unread(self, lane: _Lane) -> list[str]:
        """Topics whose lane a held head waits on with no end read since it arrived."""
        if not self._held(lane):
            return []
        need, arrived = lane.waits[lane.buffer[0].offset]
        return [
            topic
            for topic in need
            if (other := self._lanes.get((topic, lane.partition))) is not None and other.end[1] < arrived
        ]


def _size(record: SourceRecord) -> int:
    return len(record.value) + len(record.key or b"")


def _topic_of(members: list[_Lane], rank: int) -> str:
    for lane in members:
        if lane.rank == rank:
            return lane.topic
    raise KeyError(rank)
