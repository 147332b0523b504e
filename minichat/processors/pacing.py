"""How much waits in the engine's lanes: which input partitions to pause and resume (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Set

from minichat.processors.merge import LaneKey


def pacing(
    lanes: Mapping[LaneKey, tuple[int, int]], paused: Set[LaneKey], most: int, budget: int
) -> tuple[list[LaneKey], list[LaneKey]]:
    """(lanes to pause, paused lanes to resume), from each lane's (records, bytes) buffered.

    What waits in the lanes is bounded: a lane holding `most` records pauses (another lane of its
    set holds it back), and while all lanes together hold `budget` bytes every lane with records
    pauses (big records wait for their batches). A lane resumes once half drained, and an empty
    one at once: its set may be waiting for its next record, and the bytes the other lanes hold
    cannot leave before it comes. (Measured: a lane paused by the byte budget and then emptied,
    while the rest of its set held half the budget, kept the worker stalled for good at 3,000
    requests/s.)"""
    total = sum(size_bytes for _, size_bytes in lanes.values())
    pause, resume = [], []
    for lane, (size, _) in lanes.items():
        if lane not in paused:
            if size >= most or (size and total >= budget):
                pause.append(lane)
        elif size == 0 or (size < most // 2 and total < budget // 2):
            resume.append(lane)
    return pause, resume
