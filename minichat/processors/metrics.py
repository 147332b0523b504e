"""The worker's metrics, on `prometheus_client` objects in a registry of the worker's own (tests
build several workers in one process), and its `/metrics` page.

`SPECS` declares every metric once, with the label sets known in advance: they are all created at
start, so a counter begins at 0 and a histogram exists before its first observation (`increase()`
sees the first dead letter, deadlock or refused record; a series born at 1 would hide it).
Counters and histograms are per process (Prometheus sums the workers); the database gauges
describe the shared state (every worker reports the same value: aggregate them with `max`) and
are set by one background task (`web.GaugeCache`), never by a scrape, so a scrape answers from
memory whatever PostgreSQL or Kafka do; `minichat_db_gauges_age_seconds` says how old they are.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import logging
import math
import re
import time
from bisect import bisect_left
from collections import Counter as CountOf
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from minichat.models.events import DEAD_LETTER_CODES, DECISION_ERROR_CODES
from minichat.models.events.vocabulary import DELETE_COMMANDS, TurnCommandType
from minichat.processors.errors import RETRIED_CLASSES
from minichat.storage.metrics import StateGauges

logger = logging.getLogger(__name__)

# `_created` series double the series count and nothing here reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

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
    *(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05),
    *(0.075, 0.1, 0.2, 0.5, 1.0, 5.0),
)
"""Upper bounds (seconds) of `minichat_stage_seconds`: fine where a lightly loaded worker's stages live."""

TOPICS: Final = ("turn_requests", "provider_responses", "usage")
"""The `topic` label of the input topics (the name without the deployment's prefix)."""
UNKNOWN_CODE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""The shape of every code the contract names: an unknown code of another shape is counted `other`."""
UNKNOWN_CODES_MAX: Final = 32
"""Distinct unknown failure codes a worker labels by name; any further one is counted `other`."""
OTHER: Final = "other"
BULK_MIN: Final = 8
"""From this many values at once a histogram is added to per bucket, not per value."""
DROP_REASONS: Final = (
    *("foreign_chat", "request_rejected", "unchanged", "not_running", "progress_seen"),
    *("progress_moved_on", "not_waiting_for_usage", "usage_already_reported"),
)
"""Why a provider or usage event changed nothing (processors/turn_events.py, domain/turns.py)."""
COMMIT_ERRORS: Final = (
    *("CommitFailedError", "RebalanceInProgressError", "IllegalGenerationError", "UnknownMemberIdError"),
    *("KafkaTimeoutError", "KafkaConnectionError", "NodeNotReadyError", "NotCoordinatorForGroupError"),
    "GroupCoordinatorNotAvailableError",
)
"""The Kafka errors an offset commit usually fails with (another one still counts, from 1)."""


def records_label(records: int) -> str:
    """The `records` label of `minichat_batch_statements`: the upper bound of the batch-size bucket
    a batch of `records` falls in (`"50"`: 11 to 50 records), so a scrape gives the mean number of
    statements of small batches exactly (its `_sum` / `_count`)."""
    bound = next((b for b in BUCKETS_RECORDS if records <= b), None)
    return "+Inf" if bound is None else str(int(bound))


Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric: its kind, help, label names, the label sets created at start, its buckets."""

    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    known: tuple[tuple[str, ...], ...] = ((),)
    buckets: tuple[float, ...] = BUCKETS_S


def _spec(kind: Kind, help: str, buckets: tuple[float, ...], labels: Mapping[str, Iterable[str]]) -> Spec:
    """Every combination of the given label values is a known label set."""
    known = tuple(itertools.product(*(tuple(v) for v in labels.values())))
    return Spec(kind, help, tuple(labels), known, buckets)


def counter(help: str, **labels: Iterable[str]) -> Spec:
    return _spec("counter", help, BUCKETS_S, labels)


def histogram(help: str, buckets: tuple[float, ...] = BUCKETS_S, **labels: Iterable[str]) -> Spec:
    return _spec("histogram", help, buckets, labels)


def gauge(help: str, labels: tuple[str, ...] = ()) -> Spec:
    """A gauge; its label sets (if any) come and go with what it describes."""
    return Spec("gauge", help, labels, () if labels else ((),))


def _decision_label_sets() -> tuple[tuple[str, ...], ...]:
    """(command, decision, error_code, replay) of every answer the contract allows."""
    commands: tuple[TurnCommandType, ...] = ("turn.requested", "turn.retry", "turn.edit", *DELETE_COMMANDS)
    sets = []
    for command in sorted(commands):
        answers = [("done", "")] if command in DELETE_COMMANDS else [("allow", ""), ("downgrade", "")]
        answers += [("reject", code) for code in DECISION_ERROR_CODES]
        sets += [(command, d, code, replay) for d, code in answers for replay in ("false", "true")]
    return tuple(sets)


SPECS: Final[dict[str, Spec]] = {
    # -- counters
    "minichat_records_total": Spec(
        "counter",
        "Input records consumed, by topic and outcome (applied or dead_letter).",
        ("topic", "outcome"),
        (*((t, "applied") for t in TOPICS), ("all", "dead_letter")),
    ),
    "minichat_dead_letters_total": Spec(
        "counter",
        "Records dead-lettered, by topic and error code.",
        ("topic", "code"),
        (*itertools.product(TOPICS, DEAD_LETTER_CODES), ("turn_events", "tenant_mismatch")),
    ),
    "minichat_records_refused_total": counter(
        "Records PostgreSQL refused for their content (isolated from their batch, dead-lettered "
        "unprocessable).",
        topic=TOPICS,
    ),
    "minichat_decisions_total": Spec(
        "counter",
        "turn.decision answers, by command, decision, error code and replay.",
        ("command", "decision", "error_code", "replay"),
        _decision_label_sets(),
    ),
    "minichat_turn_events_dropped_total": counter(
        "Provider and usage events that changed nothing, by reason.", reason=DROP_REASONS
    ),
    "minichat_failed_unknown_code_total": counter(
        "turn.failed events settled failed/estimated because their error_code is not one the "
        f"contract names, by code (at most {UNKNOWN_CODES_MAX} codes by name, then `other`).",
        code=(OTHER,),
    ),
    "minichat_batches_total": counter("Merged batches applied (one transaction each).", agent=("engine",)),
    "minichat_batch_retries_total": counter(
        "Batch transactions retried, by error class (DeadlockDetectedError: a lock cycle, which the "
        "engine's lock order should make impossible; connection errors: PostgreSQL away).",
        error=RETRIED_CLASSES,
    ),
    "minichat_batch_records_total": counter("Records in the merged batches applied."),
    "minichat_batch_steps_total": counter(
        "Steps (runs of commands or of facts) the merged batches were cut into."
    ),
    "minichat_offset_commit_failures_total": counter(
        "Kafka offset commits that failed, by error class.", error=COMMIT_ERRORS
    ),
    "minichat_order_log_published_total": counter("order.applied entries relayed to order-log."),
    "minichat_batch_groups_total": counter(
        "Concurrent groups (no chat or user shared) big batches were split into."
    ),
    "minichat_after_satisfied_by_offset_total": counter(
        "Offsets named by commands' causal tokens (after) met by their record being applied, by topic.",
        topic=TOPICS[1:],
    ),
    "minichat_after_satisfied_by_end_total": counter(
        "Offsets named by commands' causal tokens (after) met because the lane's end was not past them "
        "(no such record), by topic.",
        topic=TOPICS[1:],
    ),
    "minichat_events_parked_total": counter(
        "Provider and usage events parked until their command is decided."
    ),
    "minichat_billing_published_total": counter(
        "Billing events this worker relayed to billing-usage (acknowledged)."
    ),
    "minichat_alerts_published_total": counter(
        "Budget alerts (quota.threshold_crossed) this worker relayed to quota-alerts (acknowledged)."
    ),
    # -- histograms
    "minichat_batch_stage_seconds": histogram(
        "Time of a batch step's stages in the transaction: load, decide, write.",
        stage=("load", "decide", "write"),
        step=("commands", "facts"),
    ),
    "minichat_batch_size_records": histogram("Records per merged batch.", BUCKETS_RECORDS),
    "minichat_batch_statements": histogram(
        "Statements a merged batch sent to PostgreSQL inside its transaction(s) (BEGIN and COMMIT not "
        "counted), by the batch-size bucket its records fall in (records: the bucket's upper bound).",
        BUCKETS_STATEMENTS,
        records=(*(str(int(b)) for b in BUCKETS_RECORDS), "+Inf"),
    ),
    "minichat_billing_lag_seconds": histogram(
        "From a billing event's commit to the outbox until billing-usage acknowledged it (the relay's lag)."
    ),
    "minichat_record_wait_seconds": histogram(
        "From an input record's timestamp (its append to the log) until the engine released it in "
        "merged order: fetch plus the ordering wait."
    ),
    "minichat_batch_seconds": histogram(
        "Time of a merged batch's stages: its transaction, and producing its outputs.",
        stage=("transaction", "produce"),
    ),
    "minichat_decision_seconds": histogram(
        "From a command's append to the log until its batch's decisions were acknowledged by the broker."
    ),
    "minichat_stage_seconds": histogram(
        "A command's time in each stage on its way to its decision: fetch, order, assembly, "
        "transaction, produce (they add up to minichat_decision_seconds).",
        BUCKETS_STAGE_S,
        stage=("fetch", "order", "assembly", "transaction", "produce"),
    ),
    # -- gauges
    "minichat_build_info": gauge(
        "Always 1; label version: the minichat version this worker runs.", ("version",)
    ),
    "minichat_consumer_lag": gauge(
        "Input records not applied yet, per owned input partition (the log end seen by the last fetch "
        "minus the stored position).",
        ("topic", "partition"),
    ),
    "minichat_db_gauges_age_seconds": gauge(
        "Seconds since the database gauges were last read (+Inf before the first reading): they grow "
        "while PostgreSQL is unreachable."
    ),
    "minichat_parked_events": gauge("Provider and usage events waiting for their command's decision."),
    "minichat_parked_oldest_age_seconds": gauge("Age of the oldest parked event (0 when none)."),
    "minichat_outbox_unpublished": gauge("Billing events and budget alerts not yet relayed."),
    "minichat_outbox_oldest_age_seconds": gauge(
        "Age of the oldest billing event not yet relayed (0 when none)."
    ),
    "minichat_reserved_credits_micro": gauge(
        "Credits reserved by running or unsettled turns, all tenants (the `total` bucket, which every "
        "reserve is on: a premium turn's second reserve on `tier:premium` is not added)."
    ),
}
"""Every metric a worker exports (besides prometheus_client's `process_*` and `python_*`)."""

DB_GAUGES: Final[dict[str, Callable[[StateGauges], float]]] = {
    "minichat_parked_events": lambda g: g.parked_events,
    "minichat_parked_oldest_age_seconds": lambda g: round(g.parked_oldest_age_s, 3),
    "minichat_outbox_unpublished": lambda g: g.outbox_unpublished,
    "minichat_outbox_oldest_age_seconds": lambda g: round(g.outbox_oldest_age_s, 3),
    "minichat_reserved_credits_micro": lambda g: g.reserved_credits_micro,
}
"""The gauges of the shared state, read from PostgreSQL: every worker reports the same value, so
dashboards and alerts aggregate them with `max` (a `sum` counts them once per worker)."""
SHARED_GAUGES: Final = frozenset({*DB_GAUGES, "minichat_db_gauges_age_seconds"})
"""The gauges to aggregate with `max` across workers."""

_HELP: Final = {name: spec.help for name, spec in SPECS.items()}

Lag = Mapping[tuple[str, int], int]
"""(topic label, partition) -> records not applied yet."""


def build_version() -> str:
    try:
        return importlib.metadata.version("minichat")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _make(name: str, spec: Spec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind == "counter":
        return Counter(name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
    return Gauge(name, spec.help, spec.labels, registry=registry)


class Metrics:
    """One worker's metrics. The hot path calls `inc` and `observe` by name (a label set's child
    object is looked up once, then cached)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics = {name: _make(name, spec, self.registry) for name, spec in SPECS.items()}
        for name, spec in SPECS.items():
            if spec.labels:
                for values in spec.known:
                    self._metrics[name].labels(*values)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self._children: dict[tuple[object, ...], Counter | Gauge | Histogram] = {}
        self._gauge(self._metrics["minichat_build_info"]).labels(build_version()).set(1)
        for name in DB_GAUGES:  # unknown until the first reading
            self._gauge(self._metrics[name]).set(float("nan"))
        self.db_gauges_read_at: float | None = None
        """`time.monotonic()` of the last reading of the database gauges."""
        self._gauge(self._metrics["minichat_db_gauges_age_seconds"]).set_function(self._db_gauges_age)
        self._unknown_codes: set[str] = set()
        """The unknown failure codes labelled by name (at most `UNKNOWN_CODES_MAX`)."""
        self._other_logged = False

    @staticmethod
    def _gauge(metric: Counter | Gauge | Histogram) -> Gauge:
        assert isinstance(metric, Gauge)
        return metric

    def _child(self, name: str, labels: Mapping[str, str | None]) -> Counter | Gauge | Histogram:
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            metric = self._metrics.get(name)
            if metric is None:
                raise KeyError(f"{name} is not declared in minichat.processors.metrics.SPECS")
            values = {k: "" if v is None else str(v) for k, v in labels.items()}
            child = self._children[key] = metric.labels(**values) if values else metric
        return child

    def inc(self, name: str, amount: int = 1, **labels: str | None) -> None:
        child = self._child(name, labels)
        assert isinstance(child, Counter)
        child.inc(amount)

    def observe(self, name: str, values: Iterable[float], **labels: str | None) -> None:
        """Add observations to a histogram: a few one by one, many (a batch's records) counted
        per bucket first and added once per bucket (5x cheaper a value; `test_metrics` checks it
        against `Histogram.observe`)."""
        child = self._child(name, labels)
        assert isinstance(child, Histogram)
        batch = values if isinstance(values, list | tuple) else list(values)
        if len(batch) < BULK_MIN:
            for value in batch:
                child.observe(value)
            return
        bounds = SPECS[name].buckets
        for index, n in CountOf(bisect_left(bounds, value) for value in batch).items():
            child._buckets[index].inc(n)  # index len(bounds): +Inf
        child._sum.inc(math.fsum(batch))

    def observe_times(self, name: str, value: float, times: int, **labels: str | None) -> None:
        """Add one value `times` times (a batch-wide duration, once per command it holds)."""
        child = self._child(name, labels)
        assert isinstance(child, Histogram)
        if times <= 0:
            return
        child._buckets[bisect_left(SPECS[name].buckets, value)].inc(times)
        child._sum.inc(value * times)

    def count_unknown_code(self, code: str, amount: int = 1) -> None:
        """A `turn.failed` settled `failed`/`estimated` for an `error_code` the contract does not
        name (a gateway's typo turns a free release into an estimated charge): counted by code,
        the first time a code is seen logged by name (a code, never content). Codes are labelled by
        name only when they look like a contract code, and at most `UNKNOWN_CODES_MAX` of them."""
        named = self._unknown_codes
        label = code if UNKNOWN_CODE_PATTERN.fullmatch(code) and code != OTHER else OTHER
        if label != OTHER and label not in named and len(named) >= UNKNOWN_CODES_MAX:
            label = OTHER
        if label == OTHER and not self._other_logged:
            self._other_logged = True
            logger.warning(
                "turn.failed with an unknown error_code not shaped like a contract code (or past "
                "%d distinct ones): settled failed/estimated, counted as code=%s",
                UNKNOWN_CODES_MAX,
                OTHER,
            )
        elif label != OTHER and label not in named:
            named.add(label)
            logger.warning(
                "turn.failed with unknown error_code %r: settled failed/estimated, not released "
                "(a gateway typo? the contract's failure codes: docs/contract.md)",
                label,
            )
        self.inc("minichat_failed_unknown_code_total", amount, code=label)

    def value(self, name: str, **labels: str | None) -> float:
        """A counter's current value (0 for a label set never counted)."""
        wanted = {k: "" if v is None else str(v) for k, v in labels.items()}
        for family in self._metrics[name].collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return sample.value
        return 0

    def quantile(self, name: str, q: float, **labels: str | None) -> float | None:
        """The bucket bound under which a share `q` of the observations fell (None without any)."""
        wanted = {k: "" if v is None else str(v) for k, v in labels.items()}
        buckets: list[tuple[float, float]] = []
        for family in self._metrics[name].collect():
            for sample in family.samples:
                if sample.name == f"{name}_bucket":
                    rest = {k: v for k, v in sample.labels.items() if k != "le"}
                    if rest == wanted:
                        buckets.append((float(sample.labels["le"]), sample.value))
        count = buckets[-1][1] if buckets else 0
        if not count:
            return None
        return next(bound for bound, seen in buckets if seen >= q * count)

    def set_db_gauges(self, gauges: StateGauges, at: float | None = None) -> None:
        """A new reading of the database gauges (taken at `at`, monotonic; now by default)."""
        for name, read in DB_GAUGES.items():
            self._gauge(self._metrics[name]).set(read(gauges))
        self.db_gauges_read_at = time.monotonic() if at is None else at

    def _db_gauges_age(self) -> float:
        if self.db_gauges_read_at is None:
            return float("inf")
        return round(time.monotonic() - self.db_gauges_read_at, 3)

    def set_lag(self, lag: Lag) -> None:
        """The consumer lag of the partitions owned now (the others' series go)."""
        gauge = self._gauge(self._metrics["minichat_consumer_lag"])
        gauge.clear()
        for (topic, partition), records in sorted(lag.items()):
            gauge.labels(topic, str(partition)).set(records)

    def render(self, lag: Lag | None = None) -> str:
        """The page: everything in the registry, the lag set first when given. Reads nothing but
        memory: it answers whatever PostgreSQL and Kafka do."""
        if lag is not None:
            self.set_lag(lag)
        return generate_latest(self.registry).decode()
