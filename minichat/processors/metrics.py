"""Process-local counters and histograms, and the worker's `/metrics` page, exposed with
`prometheus_client` (with its process, platform and GC collectors).

Counters and histograms are per process (as Prometheus expects: it sums the workers); gauges that
describe the shared state (parked events, the outbox backlog, reserves held) are read from
Postgres by one background task every few seconds (`web.GaugeCache`; a scrape shows the last
reading, never queries), the consumer lag per input partition from the engine. The hot
path only adds to plain Python counters; the exposition objects are built at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from minichat.storage.metrics import StateGauges

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
    "minichat_offset_commit_failures_total": "Kafka offset commits that failed, by error class.",
    "minichat_order_log_published_total": "order.applied entries relayed to order-log.",
    "minichat_batch_groups_total": "Concurrent groups (no chat or user shared) big batches were split into.",
    "minichat_after_satisfied_by_offset_total": (
        "Offsets named by commands' causal tokens (after) met by their record being applied, by topic."
    ),
    "minichat_after_satisfied_by_end_total": (
        "Offsets named by commands' causal tokens (after) met because the lane's end was not past them "
        "(no such record), by topic."
    ),
    "minichat_events_parked_total": "Provider and usage events parked until their command is decided.",
    "minichat_parked_events": "Provider and usage events waiting for their command's decision.",
    "minichat_parked_oldest_age_seconds": "Age of the oldest parked event (0 when none).",
    "minichat_outbox_unpublished": "Billing events not yet relayed to billing-usage.",
    "minichat_outbox_oldest_age_seconds": "Age of the oldest billing event not yet relayed (0 when none).",
    "minichat_consumer_lag": (
        "Input records not applied yet, per owned input partition (the log end seen by the last fetch "
        "minus the stored position)."
    ),
    "minichat_batch_stage_seconds": "Time of a batch step's stages in the transaction: load, decide, write.",
    "minichat_batch_size_records": "Records per merged batch.",
    "minichat_batch_statements": (
        "Statements a merged batch sent to PostgreSQL inside its transaction(s) (BEGIN and COMMIT not "
        "counted), by the batch-size bucket its records fall in (records: the bucket's upper bound)."
    ),
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
    "minichat_stage_seconds": (
        "A command's time in each stage on its way to its decision: fetch, order, assembly, "
        "transaction, produce (they add up to minichat_decision_seconds)."
    ),
}

BUCKETS_S = (
    *(0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01),
    *(0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0),
    *(10.0, 30.0),
)
"""Upper bounds (seconds) of the histograms of durations: a millisecond apart from 1 to 10 ms, where
a decision at low load should be."""
BUCKETS_RECORDS = (1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0)
"""Upper bounds of the batch-size histogram."""
BUCKETS_STATEMENTS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0)
"""Upper bounds of the statements-per-batch histogram."""
BUCKETS_STAGE_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
    5.0,
)
"""Upper bounds (seconds) of `minichat_stage_seconds`: fine where a lightly loaded worker's stages live."""
_BOUNDS = {
    "minichat_batch_size_records": BUCKETS_RECORDS,
    "minichat_batch_statements": BUCKETS_STATEMENTS,
    "minichat_stage_seconds": BUCKETS_STAGE_S,
}


def records_label(records: int) -> str:
    """The `records` label of `minichat_batch_statements`: the upper bound of the batch-size bucket
    a batch of `records` falls in (`"50"`: 11 to 50 records), so a scrape gives the mean number of
    statements of small batches exactly (its `_sum` / `_count`)."""
    bound = next((b for b in BUCKETS_RECORDS if records <= b), None)
    return "+Inf" if bound is None else str(int(bound))


@dataclass(slots=True)
class _Histogram:
    bounds: tuple[float, ...] = BUCKETS_S
    buckets: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.buckets = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.buckets[bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        seen = 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            seen += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(seen)))
        return out


class Metrics:
    def __init__(self) -> None:
        self._counters: Counter[tuple[str, Labels]] = Counter()
        self._histograms: dict[tuple[str, Labels], _Histogram] = {}

    def observe(self, name: str, values: Iterable[float], **labels: str | None) -> None:
        """Add observations (seconds) to a histogram."""
        key = (name, _key(labels))
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = _Histogram(_BOUNDS.get(name, BUCKETS_S))
        for value in values:
            histogram.observe(value)

    def observe_times(self, name: str, value: float, times: int, **labels: str | None) -> None:
        """Add one value `times` times (a batch-wide duration, once per record it holds)."""
        key = (name, _key(labels))
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = _Histogram(_BOUNDS.get(name, BUCKETS_S))
        histogram.observe(value, times)

    def quantile(self, name: str, q: float, **labels: str | None) -> float | None:
        """The bucket bound under which a share `q` of the observations fell (None without any)."""
        histogram = self._histograms.get((name, _key(labels)))
        if histogram is None or not histogram.count:
            return None
        seen = 0
        for bound, n in zip((*histogram.bounds, float("inf")), histogram.buckets, strict=True):
            seen += n
            if seen >= q * histogram.count:
                return bound
        return float("inf")

    def inc(self, name: str, amount: int = 1, **labels: str | None) -> None:
        self._counters[(name, _key(labels))] += amount

    def value(self, name: str, **labels: str | None) -> int:
        return self._counters[(name, _key(labels))]

    def render(self, gauges: StateGauges | None = None, lag: Lag | None = None) -> str:
        """The page: this process's counters and histograms, the state gauges, the lag, and
        `prometheus_client`'s process, platform and GC metrics."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self, gauges, lag or {}))
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        return generate_latest(registry).decode()

    def families(self) -> Iterator[Metric]:
        for name in sorted({name for name, _ in self._counters}):
            family = CounterMetricFamily(
                name, _HELP.get(name, name), labels=self._label_names(self._counters, name)
            )
            for (n, labels), value in sorted(self._counters.items()):
                if n == name:
                    family.add_metric([v for _, v in labels], value)
            yield family
        for name in sorted({name for name, _ in self._histograms}):
            histogram = HistogramMetricFamily(
                name, _HELP.get(name, name), labels=self._label_names(self._histograms, name)
            )
            for (n, labels), h in sorted(self._histograms.items()):
                if n == name:
                    histogram.add_metric([v for _, v in labels], h.cumulative(), h.total)
            yield histogram

    @staticmethod
    def _label_names(store: Mapping[tuple[str, Labels], Any], name: str) -> list[str]:
        for n, labels in store:
            if n == name:
                return [k for k, _ in labels]
        return []


Lag = Mapping[tuple[str, int], int]
"""(topic label, partition) -> records not applied yet."""


class _Snapshot(Collector):
    """One scrape's view: what `Metrics` holds now, and the gauges read for this scrape."""

    def __init__(self, metrics: Metrics, gauges: StateGauges | None, lag: Lag) -> None:
        self.metrics, self.gauges, self.lag = metrics, gauges, lag

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.families()
        if self.gauges is not None:
            for name, reading in _gauge_values(self.gauges).items():
                yield GaugeMetricFamily(name, _HELP[name], value=reading)
        lag = GaugeMetricFamily(
            "minichat_consumer_lag", _HELP["minichat_consumer_lag"], labels=["topic", "partition"]
        )
        for (topic, partition), records in sorted(self.lag.items()):
            lag.add_metric([topic, str(partition)], records)
        yield lag


def _key(labels: Mapping[str, str | None]) -> Labels:
    return tuple(sorted((k, "" if v is None else str(v)) for k, v in labels.items()))


def _gauge_values(g: StateGauges) -> Mapping[str, int | float]:
    return {
        "minichat_parked_events": g.parked_events,
        "minichat_parked_oldest_age_seconds": round(g.parked_oldest_age_s, 3),
        "minichat_outbox_unpublished": g.outbox_unpublished,
        "minichat_outbox_oldest_age_seconds": round(g.outbox_oldest_age_s, 3),
        "minichat_reserved_credits_micro": g.reserved_credits_micro,
    }
