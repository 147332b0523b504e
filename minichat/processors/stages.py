"""Where a command's time goes on its way to its decision: `minichat_stage_seconds{stage}`.

Per command record, one observation per stage, so the stages' sums add up to the command's
`minichat_decision_seconds`:

```
fetch        its append (LogAppendTime) until the fetch task handed it to its lane
order        handed to the lane until the merge released it (the ordering wait)
assembly     released until its batch's transaction began (decode, grouping, output flights)
transaction  the transaction (claim, apply, store positions) until it committed
produce      committed until every output of its batch was acknowledged by the broker
```
Buckets resolve 0.5–10 ms, where the stages of a lightly loaded worker live.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence

from minichat.processors.merge import LaneKey
from minichat.processors.metrics import Metrics
from minichat.processors.records import SourceRecord

STAGE_SECONDS = "minichat_stage_seconds"


class StageClock:
    """Notes when records reach each stage; observes the commands' stage times."""

    def __init__(self, metrics: Metrics, commands_topic: str) -> None:
        self.metrics = metrics
        self.commands_topic = commands_topic
        self._fetched: dict[LaneKey, deque[tuple[int, float]]] = {}
        """Per lane, (first offset, wall ms) of each fetched chunk of commands not released yet."""

    def fetched(self, records: Sequence[SourceRecord]) -> None:
        """A chunk of one partition's records, just handed to its lane."""
        if not records or records[0].topic != self.commands_topic:
            return
        now_ms = time.time() * 1000.0
        first = records[0]
        self._fetched.setdefault((first.topic, first.partition), deque()).append((first.offset, now_ms))
        self._observe("fetch", ((now_ms - r.timestamp_ms) / 1000.0 for r in records))

    def released(self, records: Iterable[SourceRecord]) -> float:
        """Records the merge just released; returns the wall time (ms) it took as their release."""
        now_ms = time.time() * 1000.0
        waits = []
        for r in records:
            if r.topic != self.commands_topic:
                continue
            chunks = self._fetched.get((r.topic, r.partition))
            while chunks and len(chunks) > 1 and chunks[1][0] <= r.offset:
                chunks.popleft()
            if chunks and chunks[0][0] <= r.offset:
                waits.append((now_ms - chunks[0][1]) / 1000.0)
        self._observe("order", waits)
        return now_ms

    def reopened(self, lane: LaneKey) -> None:
        """A lane re-sought: its fetch times no longer match its next records."""
        self._fetched.pop(lane, None)

    def batch(self, stage: str, seconds: float, commands: int) -> None:
        """A batch-wide stage (`assembly`, `transaction`, `produce`), once per command it holds."""
        if commands:
            self.metrics.observe_times(STAGE_SECONDS, seconds, commands, stage=stage)

    def _observe(self, stage: str, values: Iterable[float]) -> None:
        self.metrics.observe(STAGE_SECONDS, values, stage=stage)
