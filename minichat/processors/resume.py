"""Where a partition resumes after an assignment or a position conflict (pure; `engine._seek`).

The stored position (written with the state, `storage/coordination.py`) is the truth: every
record before it was applied. Outputs leave after the transaction, so the offset up to which they
were acknowledged can be lower: resuming there re-sends them (`replay: true`) and changes nothing
else. Two records of it: Kafka's committed offset (committed once a batch's outputs were
acknowledged; the broker deletes an idle group's offsets after `offsets.retention.minutes`), and
the acknowledged offsets the worker keeps in PostgreSQL next to the positions (written with the
next batch and at a graceful stop). The higher of the two counts; with neither (nothing was ever
acknowledged) the log's beginning.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

import asyncpg

from minichat.processors.merge import LaneKey
from minichat.processors.records import Output, SourceRecord

K = TypeVar("K", bound=Hashable)


def acknowledged(committed: int | None, kept: int | None) -> int | None:
    """Up to where outputs are known to be acknowledged: Kafka's committed offset or the one kept
    in PostgreSQL, whichever is higher (None: neither exists)."""
    known = [offset for offset in (committed, kept) if offset is not None]
    return max(known) if known else None


def resume_offset(stored: int, acknowledged: int | None, beginning: int) -> int:
    """The offset to seek to: the stored position, or the (still readable) acknowledged offset
    below it; nothing known acknowledged: the beginning (every decision re-sent, nothing changed)."""
    if acknowledged is None:
        return beginning
    return min(stored, max(acknowledged, beginning))


def resume_at(stored: int, committed: int | None, kept: int | None, beginning: int) -> tuple[int, int | None]:
    """The offset to seek to, and the acknowledged offset it was chosen from (for the log)."""
    done = acknowledged(committed, kept)
    return resume_offset(stored, done, beginning), done


def ahead_of_group(starts: Mapping[K, int], committed: Mapping[K, int | None]) -> dict[K, int]:
    """The resume offsets past the group's committed offset, to be committed: acknowledged offsets
    kept only in PostgreSQL (a rebalance lands outputs without committing) would otherwise leave
    a partition that gets no new record showing lag for ever."""
    return {k: start for k, start in starts.items() if start > (committed.get(k) or 0)}


def next_offsets(records: Iterable[SourceRecord]) -> dict[LaneKey, int]:
    """Per input partition, the offset after the last of `records` (in offset order per partition):
    what a batch stores and, once its outputs are acknowledged, commits."""
    return {(r.topic, r.partition): r.offset + 1 for r in records}


async def apply_nothing(con: asyncpg.Connection) -> list[Output]:
    """A batch with nothing to apply: only its positions move (a refused record, the last step of
    a split batch, the acknowledged offsets at a stop)."""
    return []
