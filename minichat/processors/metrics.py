"""Process-local counters and the worker's `/metrics` page (Prometheus text format).

Counters are per process (as Prometheus expects: it sums the workers); gauges that describe the
shared state (parked events, the outbox backlog, reserves held) are read from Postgres when the
page is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

from minichat.storage.metrics import StateGauges, state_gauges

Labels = tuple[tuple[str, str], ...]

_HELP = {
    "minichat_records_total": "Input records consumed, by topic and outcome (applied or dead_letter).",
    "minichat_dead_letters_total": "Records dead-lettered, by topic and error code.",
    "minichat_records_refused_total": (
        "Records PostgreSQL refused for their content (isolated from their batch, dead-lettered "
        "unprocessable)."
    ),
    "minichat_decisions_total": "turn.decision answers, by command, decision, error code and replay.",
    "minichat_turn_events_dropped_total": "Provider and usage events that changed nothing, by reason.",
    "minichat_batches_total": "Merged batches applied (one transaction each).",
    "minichat_batch_retries_total": (
        "Batch transactions retried, by error class (DeadlockDetectedError: a lock cycle, which the "
        "engine's lock order should make impossible; connection errors: PostgreSQL away)."
    ),
    "minichat_batch_records_total": "Records in the merged batches applied.",
    "minichat_batch_steps_total": "Steps (runs of commands or of facts) the merged batches were cut into.",
    "minichat_events_parked_total": "Provider and usage events parked until their command is decided.",
    "minichat_parked_events": "Provider and usage events waiting for their command's decision.",
    "minichat_parked_oldest_age_seconds": "Age of the oldest parked event (0 when none).",
    "minichat_outbox_unpublished": "Billing events not yet relayed to billing-usage.",
    "minichat_billing_published_total": "Billing events this worker relayed to billing-usage (acknowledged).",
    "minichat_billing_lag_seconds": (
        "From a billing event's commit to the outbox until billing-usage acknowledged it (the relay's lag)."
    ),
    "minichat_reserved_credits_micro": "Credits reserved by running or unsettled turns, all tenants.",
    "minichat_record_wait_seconds": (
        "From an input record's timestamp (its append to the log) until the engine released it in "
        "merged order: fetch plus the ordering wait."
    ),
    "minichat_batch_seconds": "Time of a merged batch's stages: its transaction, and producing its outputs.",
    "minichat_decision_seconds": (
        "From a command's append to the log until its batch's decisions were acknowledged by the broker."
    ),
}

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of every histogram's buckets."""


@dataclass(slots=True)
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(BUCKETS_S, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self._counters: Counter[tuple[str, Labels]] = Counter()
        self._histograms: dict[tuple[str, Labels], _Histogram] = {}

    def observe(self, name: str, values: Iterable[float], **labels: str | None) -> None:
        """Add observations (seconds) to a histogram."""
        key = (name, _key(labels))
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = _Histogram()
        for value in values:
            histogram.observe(value)

    def quantile(self, name: str, q: float, **labels: str | None) -> float | None:
        """The bucket bound under which a share `q` of the observations fell (None without any)."""
        histogram = self._histograms.get((name, _key(labels)))
        if histogram is None or not histogram.count:
            return None
        seen = 0
        for bound, n in zip((*BUCKETS_S, float("inf")), histogram.buckets, strict=True):
            seen += n
            if seen >= q * histogram.count:
                return bound
        return float("inf")

    def inc(self, name: str, amount: int = 1, **labels: str | None) -> None:
        self._counters[(name, _key(labels))] += amount

    def value(self, name: str, **labels: str | None) -> int:
        return self._counters[(name, _key(labels))]

    def render(self, gauges: StateGauges | None = None) -> str:
        lines: list[str] = []
        names = sorted({name for name, _ in self._counters})
        for name in names:
            lines += _header(name, "counter")
            for (n, labels), value in sorted(self._counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {value}")
        for name in sorted({name for name, _ in self._histograms}):
            lines += _header(name, "histogram")
            for (n, labels), histogram in sorted(self._histograms.items()):
                if n == name:
                    lines += _histogram_lines(name, labels, histogram)
        if gauges is not None:
            for gauge, reading in _gauge_values(gauges).items():
                lines += _header(gauge, "gauge")
                lines.append(f"{gauge} {reading}")
        return "\n".join(lines) + "\n"


def _key(labels: Mapping[str, str | None]) -> Labels:
    return tuple(sorted((k, "" if v is None else str(v)) for k, v in labels.items()))


def _histogram_lines(name: str, labels: Labels, histogram: _Histogram) -> list[str]:
    lines: list[str] = []
    seen = 0
    for bound, n in zip((*BUCKETS_S, float("inf")), histogram.buckets, strict=True):
        seen += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f"{name}_bucket{_labels((*labels, ('le', le)))} {seen}")
    lines.append(f"{name}_sum{_labels(labels)} {histogram.total:.6f}")
    lines.append(f"{name}_count{_labels(labels)} {histogram.count}")
    return lines


def _header(name: str, kind: str) -> list[str]:
    return [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} {kind}"]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels
    )
    return "{" + escaped + "}"


def _gauge_values(g: StateGauges) -> Mapping[str, int | float]:
    return {
        "minichat_parked_events": g.parked_events,
        "minichat_parked_oldest_age_seconds": round(g.parked_oldest_age_s, 3),
        "minichat_outbox_unpublished": g.outbox_unpublished,
        "minichat_reserved_credits_micro": g.reserved_credits_micro,
    }


async def render_metrics(metrics: Metrics, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> str:
    db = await pool()
    async with db.acquire() as con:
        gauges = await state_gauges(con)
    return metrics.render(gauges)
