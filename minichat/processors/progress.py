"""The engine's progress line: what an operator reading the log wants every half minute while
records flow (batches, their size, steps and groups, and the stage latencies so far)."""

from __future__ import annotations

import logging
import time

from minichat.processors.metrics import Metrics

logger = logging.getLogger("minichat.processors.engine")

PROGRESS_REPORT_S = 30.0

_STAGES = {
    "record wait": ("minichat_record_wait_seconds", {}),
    "transaction": ("minichat_batch_seconds", {"stage": "transaction"}),
    "produce": ("minichat_batch_seconds", {"stage": "produce"}),
    "decision": ("minichat_decision_seconds", {}),
}


class ProgressReport:
    """Differences of the engine's counters since the last line, so a line says what just happened."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._at = time.monotonic()
        self._batches = self._records = self._steps = self._groups = 0.0

    def maybe_log(self) -> None:
        """One INFO line every `PROGRESS_REPORT_S` while records flow."""
        now = time.monotonic()
        if now - self._at < PROGRESS_REPORT_S:
            return
        m = self.metrics
        batches = m.value("minichat_batches_total", agent="engine")
        records = m.value("minichat_batch_records_total")
        steps = m.value("minichat_batch_steps_total")
        groups = m.value("minichat_batch_groups_total")
        done = batches - self._batches
        if done:
            logger.info(
                "applied %d records in %d batches (%.0f records, %.1f steps a batch; %d groups of"
                " split batches) in the last %.0f s",
                records - self._records,
                done,
                (records - self._records) / done,
                (steps - self._steps) / done,
                groups - self._groups,
                now - self._at,
            )
            logger.info("since start, p50/p99 ms: %s", self.stage_quantiles())
        self._at = now
        self._batches, self._records, self._steps, self._groups = batches, records, steps, groups

    def stage_quantiles(self) -> str:
        parts = []
        for label, (name, labels) in _STAGES.items():
            p50, p99 = self.metrics.quantile(name, 0.5, **labels), self.metrics.quantile(name, 0.99, **labels)
            if p50 is not None and p99 is not None:
                parts.append(f"{label} <={p50 * 1000:g}/<={p99 * 1000:g}")
        return ", ".join(parts)
