"""The applied order a rebuild follows: each partition set's records in the order the workers
recorded on `order-log` (`processors/order_log.py`), the timestamp merge only past its end.

Rules (docs/architecture.md, "Determinism"):

* Entries are read in the topic's order (partition *p*: set *p*). The first entry that names a
  record wins: a later one (a batch retried, or re-applied after a restart before its outputs were
  acknowledged, or a zombie's) re-applied it without changing anything.
* Only records of the rebuild's range count ([start, end) per input partition).
* Per input partition, the recorded order covers the records from the range's start up to the first
  one no entry names (the *order log's end* for that partition; normally the records the workers
  had applied, less the entries the relay had not published yet). Those records are applied in the
  recorded order; every record after it, in the worker's timestamp merge (`processors/merge.py`),
  once the set's recorded records are all applied.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from minichat.models.events import OrderApplied
from minichat.models.topics import TopicNames
from minichat.processors.merge import LaneKey
from minichat.processors.order_log import Run
from minichat.processors.records import SourceRecord
from minichat.settings import Settings
from minichat.tools.kafka import read_topic, topic_partitions
from minichat.tools.rebuild.sources import RebuildSetupError

logger = logging.getLogger("minichat.replay")

Piece = tuple[str, int, int]
"""(topic, first offset, end offset exclusive)"""


class _Covered:
    """Disjoint, sorted [start, end) ranges of one partition's offsets."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def subtract(self, first: int, end: int) -> list[tuple[int, int]]:
        """The parts of [first, end) not covered yet; they are covered afterwards."""
        pieces: list[tuple[int, int]] = []
        cursor = first
        i = max(0, bisect.bisect_right(self.starts, first) - 1)
        while i < len(self.starts) and self.starts[i] < end:
            if self.ends[i] > cursor:
                if self.starts[i] > cursor:
                    pieces.append((cursor, self.starts[i]))
                cursor = self.ends[i]
            i += 1
        if cursor < end:
            pieces.append((cursor, end))
        for a, b in pieces:
            self._add(a, b)
        return pieces

    def _add(self, first: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, first)
        if i > 0 and self.ends[i - 1] == first:  # joins the range before
            i -= 1
            first = self.starts[i]
            del self.starts[i], self.ends[i]
        if i < len(self.starts) and self.starts[i] == end:  # joins the range after
            end = self.ends[i]
            del self.starts[i], self.ends[i]
        self.starts.insert(i, first)
        self.ends.insert(i, end)

    def end_from(self, start: int) -> int:
        """The first offset at or after `start` not covered."""
        i = bisect.bisect_right(self.starts, start) - 1
        return self.ends[i] if i >= 0 and self.ends[i] > start else start


class RecordedOrder:
    """What `order-log` says of a rebuild's range, and the records waiting for their turn in it.

    `runs_by_set`: per partition set, the runs of its entries in the topic's order, topics by their
    full names. `ranges`: [start, end) of every input partition of the rebuild."""

    def __init__(
        self, runs_by_set: Mapping[int, Iterable[Run]], ranges: Mapping[LaneKey, tuple[int, int]]
    ) -> None:
        covered: dict[LaneKey, _Covered] = {}
        pieces_by_set: dict[int, list[Piece]] = {}
        for number, runs in runs_by_set.items():
            for topic, first, last in runs:
                lane = (topic, number)
                if lane not in ranges:
                    continue
                start, end = ranges[lane]
                a, b = max(first, start), min(last + 1, end)
                if a < b:
                    new = covered.setdefault(lane, _Covered()).subtract(a, b)
                    pieces_by_set.setdefault(number, []).extend((topic, x, y) for x, y in new)
        self.ends: dict[LaneKey, int] = {
            lane: covered[lane].end_from(start) if lane in covered else start
            for lane, (start, _) in ranges.items()
        }
        """Per input partition, where the recorded order ends (the merge takes over there)."""
        self._todo: dict[int, deque[Piece]] = {}
        for number, recorded in pieces_by_set.items():
            cut = [
                (t, x, min(y, self.ends[(t, number)])) for t, x, y in recorded if x < self.ends[(t, number)]
            ]
            if cut:
                self._todo[number] = deque(cut)
        self.gaps = sum(1 for lane, c in covered.items() if c.ends and c.ends[-1] > self.ends[lane])
        """Partitions with recorded records past a record no entry names (applied by the merge)."""
        self._held: dict[LaneKey, dict[int, SourceRecord]] = {}
        self._beyond: dict[LaneKey, list[SourceRecord]] = {}
        self._done: list[int] = []

    def pending(self, number: int) -> bool:
        """Set `number` still has recorded records to apply (its merge lanes are not open yet)."""
        return number in self._todo

    def add(self, record: SourceRecord) -> bool:
        """Keep a fetched record of a set still following its recorded order; False: the set is
        past it, the record goes to the merge."""
        if record.partition not in self._todo:
            return False
        lane = (record.topic, record.partition)
        if record.offset < self.ends[lane]:
            self._held.setdefault(lane, {})[record.offset] = record
        else:
            self._beyond.setdefault(lane, []).append(record)
        return True

    def buffered_of(self, lane: LaneKey) -> int:
        return len(self._held.get(lane, ())) + len(self._beyond.get(lane, ()))

    def wants(self, lane: LaneKey) -> bool:
        """The next recorded record of the lane's set is on this lane and not fetched yet: fetch it
        whatever the lane holds (the recorded order can take a partition's records out of offset
        order: the concurrent groups of a split batch)."""
        todo = self._todo.get(lane[1])
        if not todo:
            return False
        topic, first, _ = todo[0]
        return topic == lane[0] and first not in self._held.get(lane, {})

    def release(self, limit: int) -> list[SourceRecord]:
        """Up to `limit` records, each set's in its recorded order, as far as they are fetched."""
        out: list[SourceRecord] = []
        for number in list(self._todo):
            todo = self._todo[number]
            while todo and len(out) < limit:
                topic, first, end = todo[0]
                record = self._held.get((topic, number), {}).pop(first, None)
                if record is None:
                    break
                out.append(record)
                if first + 1 == end:
                    todo.popleft()
                else:
                    todo[0] = (topic, first + 1, end)
            if not todo:
                del self._todo[number]
                self._done.append(number)
        return out

    def finished(self) -> list[tuple[int, list[SourceRecord]]]:
        """The sets whose recorded order was applied since the last call, each with the records
        fetched past its end (in offset order per partition): the merge takes them on."""
        done, self._done = self._done, []
        return [
            (
                number,
                [r for lane in sorted(self._beyond) if lane[1] == number for r in self._beyond.pop(lane)],
            )
            for number in done
        ]


def decode_order(
    names: TopicNames, records: Iterable[tuple[bytes | None, bytes | None]]
) -> dict[int, list[Run]]:
    """The runs of `order-log` records, per set in the topic's order, with full topic names; a record
    that is not a valid `order.applied` keyed by its set is skipped with a warning."""
    runs: dict[int, list[Run]] = {}
    skipped = 0
    for key, value in records:
        try:
            entry = OrderApplied.model_validate_json(value or b"")
        except ValidationError:
            skipped += 1
            continue
        if key != str(entry.partition_set).encode():
            skipped += 1
            continue
        runs.setdefault(entry.partition_set, []).extend((names.full(t), a, b) for t, a, b in entry.runs)
    if skipped:
        logger.warning(
            "%d record(s) of %s are not valid order.applied records; ignored", skipped, names.order_log
        )
    return runs


async def read_order(
    settings: Settings, names: TopicNames, ranges: Mapping[Any, tuple[int, int]]
) -> RecordedOrder | None:
    """`order-log` up to its end offsets taken now (after the inputs'), as the range's recorded
    order; None (every record merged, with a warning) when the topic does not exist."""
    if not (await topic_partitions(settings, [names.order_log])).get(names.order_log):
        logger.warning("%s does not exist: every record is applied in the timestamp merge", names.order_log)
        return None
    try:
        runs = decode_order(names, await read_topic(settings, names.order_log))
    except TimeoutError as exc:
        raise RebuildSetupError(f"cannot read {names.order_log}: {exc}") from exc
    order = RecordedOrder(runs, {(tp.topic, tp.partition): span for tp, span in ranges.items()})
    if order.gaps:
        logger.warning(
            "%d input partition(s) have recorded records past a record no order.applied names: "
            "those are applied in the timestamp merge", order.gaps,
        )  # fmt: skip
    logger.info("read the applied order of %d partition set(s) from %s", len(runs), names.order_log)
    return order


def recorded_count(order: RecordedOrder | None, ranges: Mapping[Any, tuple[int, int]]) -> int:
    """Records of the range applied in the recorded order."""
    if order is None:
        return 0
    return sum(order.ends[(tp.topic, tp.partition)] - start for tp, (start, _) in ranges.items())
