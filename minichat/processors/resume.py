"""Where a partition resumes after an assignment or a position conflict (pure; `engine._seek`).

The stored position (written with the state, `storage/coordination.py`) is the truth: every
record before it was applied. Kafka's committed offset follows a batch only once its outputs were
acknowledged, so a lower committed offset means outputs that may not have gone out: resuming there
re-sends them (`replay: true`) and changes nothing else. A missing committed offset (never
committed, or deleted by the broker's `offsets.retention.minutes`) says nothing: the stored
position alone decides, so an expired group offset never re-runs the whole log.
"""

from __future__ import annotations

from collections.abc import Iterable

from minichat.processors.merge import LaneKey
from minichat.processors.records import SourceRecord


def resume_offset(stored: int, committed: int | None, beginning: int) -> int:
    """The offset to seek to: the stored position, or the (still readable) committed offset below it."""
    if committed is None:
        return stored
    return min(stored, max(committed, beginning))


def next_offsets(records: Iterable[SourceRecord]) -> dict[LaneKey, int]:
    """Per input partition, the offset after the last of `records` (in offset order per partition):
    what a batch stores and, once its outputs are acknowledged, commits."""
    return {(r.topic, r.partition): r.offset + 1 for r in records}
