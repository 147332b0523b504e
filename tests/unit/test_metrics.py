"""The worker's histograms as Prometheus text, and the bench reading them back per stage."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from minichat.bench.workers import parse_metrics, stage_quantiles
from minichat.models.events import DEAD_LETTER_CODES
from minichat.processors.metrics import (
    BUCKETS_S,
    OTHER,
    SHARED_GAUGES,
    SPECS,
    UNKNOWN_CODES_MAX,
    Metrics,
    build_version,
    records_label,
)
from minichat.storage.metrics import StateGauges


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The page as prometheus_client's own parser reads it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    m = Metrics()
    m.observe("minichat_batch_seconds", [0.002, 0.02, 0.02, 40.0], stage="transaction")
    text = m.render()
    assert "# TYPE minichat_batch_seconds histogram" in text
    found = samples(text)

    def bucket(le: str) -> float:
        return found[("minichat_batch_seconds_bucket", (("le", le), ("stage", "transaction")))]

    assert (bucket("0.001"), bucket("0.0025"), bucket("0.025"), bucket("30.0"), bucket("+Inf")) == (
        0,
        1,
        3,
        3,
        4,
    )
    assert found[("minichat_batch_seconds_count", (("stage", "transaction"),))] == 4
    assert found[("minichat_batch_seconds_sum", (("stage", "transaction"),))] == pytest.approx(40.042)


def test_counters_gauges_lag_and_process_metrics_are_on_the_page() -> None:
    m = Metrics()
    m.inc(
        "minichat_decisions_total",
        3,
        command="turn.requested",
        decision="allow",
        error_code=None,
        replay="false",
    )
    m.observe("minichat_batch_size_records", [1, 700, 700])
    gauges = StateGauges(
        parked_events=2,
        parked_oldest_age_s=1.5,
        outbox_unpublished=4,
        outbox_oldest_age_s=0.25,
        reserved_credits_micro=10,
    )
    m.set_db_gauges(gauges)
    found = samples(m.render({("turn_requests", 3): 17}))
    labels = (("command", "turn.requested"), ("decision", "allow"), ("error_code", ""), ("replay", "false"))
    assert found[("minichat_decisions_total", labels)] == 3
    assert found[("minichat_batch_size_records_bucket", (("le", "1000.0"),))] == 3
    assert found[("minichat_batch_size_records_bucket", (("le", "500.0"),))] == 1
    assert found[("minichat_outbox_oldest_age_seconds", ())] == 0.25
    assert found[("minichat_reserved_credits_micro", ())] == 10
    assert found[("minichat_consumer_lag", (("partition", "3"), ("topic", "turn_requests")))] == 17
    assert ("process_resident_memory_bytes", ()) in found
    # the lag of partitions owned no more goes
    found = samples(m.render({("usage", 1): 0}))
    assert [k for k in found if k[0] == "minichat_consumer_lag"] == [
        ("minichat_consumer_lag", (("partition", "1"), ("topic", "usage")))
    ]


def test_a_value_on_a_bound_falls_in_that_bucket() -> None:
    m = Metrics()
    m.observe("minichat_decision_seconds", [BUCKETS_S[3]])
    assert m.quantile("minichat_decision_seconds", 0.5) == BUCKETS_S[3]
    assert m.quantile("minichat_record_wait_seconds", 0.5) is None


def test_quantiles_count_only_what_happened_between_two_scrapes() -> None:
    m = Metrics()
    m.observe("minichat_decision_seconds", [5.0] * 100)
    before = parse_metrics(m.render())
    m.observe("minichat_decision_seconds", [0.003] * 98 + [0.2, 0.2])
    stages = stage_quantiles(before, parse_metrics(m.render()))
    assert stages == {"decision": {"p50": 3.0, "p99": 200.0}}  # bucket bounds
    assert stage_quantiles(before, before) == {}


def test_duration_buckets_are_a_millisecond_apart_from_1_to_10_ms() -> None:
    assert {n / 1000 for n in range(1, 11)} <= set(BUCKETS_S)
    assert list(BUCKETS_S) == sorted(set(BUCKETS_S))
    assert {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 30.0} <= set(BUCKETS_S)  # the bounds kept


def test_statements_per_batch_by_batch_size_bucket_give_the_mean_of_small_batches() -> None:
    m = Metrics()
    for records, statements in ((1, 9), (30, 12), (50, 15), (51, 20), (6000, 40)):
        m.observe("minichat_batch_statements", [statements], records=records_label(records))
    found = samples(m.render())
    by_label = {
        dict(labels)["records"]: value
        for (name, labels), value in found.items()
        if name == "minichat_batch_statements_sum" and value
    }
    assert by_label == {"1": 9, "50": 27, "100": 20, "+Inf": 40}
    assert found[("minichat_batch_statements_count", (("records", "50"),))] == 2
    assert found[("minichat_batch_statements_bucket", (("le", "12.0"), ("records", "50")))] == 1


def test_a_fresh_page_has_every_counter_at_0_and_every_histogram() -> None:
    """Each known label set exists before anything happened: `increase()` sees the first dead
    letter, deadlock or refused record (a series born at 1 hides it)."""
    found = samples(Metrics().render())
    for name, spec in SPECS.items():
        for values in spec.known:
            labels = tuple(sorted(zip(spec.labels, values, strict=True)))
            if spec.kind == "counter":
                assert found[(name, labels)] == 0, (name, labels)
            elif spec.kind == "histogram":
                assert found[(f"{name}_count", labels)] == 0, (name, labels)
                assert found[(f"{name}_bucket", tuple(sorted((*labels, ("le", "+Inf")))))] == 0
    dead = {dict(k[1])["code"] for k in found if k[0] == "minichat_dead_letters_total"}
    assert dead == set(DEAD_LETTER_CODES)  # every contract code, from the one list
    deadlocks = ("minichat_batch_retries_total", (("error", "DeadlockDetectedError"),))
    assert found[deadlocks] == 0
    assert found[("minichat_records_refused_total", (("topic", "turn_requests"),))] == 0
    assert found[("minichat_build_info", (("version", build_version()),))] == 1
    # the database gauges are unknown until read, and say so
    assert math.isnan(found[("minichat_parked_events", ())])
    assert found[("minichat_db_gauges_age_seconds", ())] == math.inf


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.inc("minichat_batches_total", agent="engine")
    assert (
        a.value("minichat_batches_total", agent="engine"),
        b.value("minichat_batches_total", agent="engine"),
    ) == (1, 0)


def test_the_database_gauges_carry_their_age() -> None:
    m = Metrics()
    m.set_db_gauges(StateGauges(1, 0.0, 0, 0.0, 0), at=time.monotonic() - 42)
    age = samples(m.render())[("minichat_db_gauges_age_seconds", ())]
    assert 42 <= age < 60


def test_unknown_failure_codes_are_counted_by_code_bounded_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="minichat.processors.metrics"):
        m.count_unknown_code("context_length")
        m.count_unknown_code("context_length", 2)
        m.count_unknown_code("Some free text, maybe a user's words")
        for n in range(UNKNOWN_CODES_MAX + 5):
            m.count_unknown_code(f"code_{n}")
    found = samples(m.render())
    codes = {
        dict(labels)["code"]: v
        for (name, labels), v in found.items()
        if name == "minichat_failed_unknown_code_total"
    }
    assert codes["context_length"] == 3
    assert len(codes) == UNKNOWN_CODES_MAX + 1  # at most that many by name, then `other`
    assert codes[OTHER] == 1 + 6  # the free text, and the codes past the cap
    named = [r.getMessage() for r in caplog.records if "'context_length'" in r.getMessage()]
    assert len(named) == 1
    assert "user's words" not in caplog.text


def test_every_metric_the_code_counts_is_declared() -> None:
    """A metric named in a call (`.inc("minichat_...")`, `.observe(...)`) without its line in
    SPECS would fail at run time: caught here, also after a merge."""
    from minichat.processors.causal import MET_METRICS

    root = Path(__file__).resolve().parents[2] / "minichat"
    calls = r"\.(?:inc|observe)\(\s*\"(minichat_\w+)\""
    used = {name for path in root.rglob("*.py") for name in re.findall(calls, path.read_text())}
    used |= set(MET_METRICS.values())
    assert used and used <= set(SPECS), sorted(used - set(SPECS))


DOCS = Path(__file__).resolve().parents[2] / "docs"


def _aggregations(expr: str, name: str) -> list[str]:
    """The aggregation operator directly around each use of `name` in `expr` ('' for none)."""
    found = []
    for match in re.finditer(rf"\b{name}\b", expr):
        before = expr[: match.start()]
        op = re.search(r"(\w+)\s*(?:by\s*\([^)]*\)\s*)?\(\s*$", before)
        found.append(op[1] if op else "")
    return found


def dashboard_exprs() -> list[str]:
    board = json.loads((DOCS / "grafana" / "minichat.json").read_text())
    return [t["expr"] for panel in board["panels"] for t in panel["targets"]]


def alert_rules() -> list[dict[str, object]]:
    rules: list[dict[str, object]] = yaml.safe_load((DOCS / "alerts.yml").read_text())["groups"][0]["rules"]
    return rules


def test_dashboard_panels_have_units_and_legends_and_shared_gauges_are_maxed() -> None:
    board = json.loads((DOCS / "grafana" / "minichat.json").read_text())
    for panel in board["panels"]:
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert all(t["legendFormat"] for t in panel["targets"]), panel["title"]
    exprs = dashboard_exprs() + [str(rule["expr"]) for rule in alert_rules()]
    for expr in exprs:
        for name in SHARED_GAUGES:
            assert set(_aggregations(expr, name)) <= {"max"}, (name, expr)
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"minichat_[a-z_]+", e)}
    assert used <= set(SPECS), sorted(used - set(SPECS))
    assert {"minichat_parked_events", "minichat_outbox_unpublished"} <= used


def test_alert_rules_assume_no_job_name_and_watch_for_absent_workers() -> None:
    rules = alert_rules()
    text = (DOCS / "alerts.yml").read_text()
    assert "job=" not in text.replace(" ", "")
    assert any(str(rule["expr"]).startswith("absent(minichat_") for rule in rules)
    for rule in rules:
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and "runbook" not in annotations and annotations["runbook_url"]


def test_many_observations_at_once_land_as_prometheus_client_would_put_them() -> None:
    """The bulk path of `observe` writes prometheus_client's buckets itself: the same page as
    observing each value with `Histogram.observe`, bounds included."""
    values = [*BUCKETS_S, 0.0, 0.0001, 0.0042, 0.0042, 29.9, 31.0, 1e9, *(b + 1e-9 for b in BUCKETS_S)]
    bulk, single = Metrics(), Metrics()
    bulk.observe("minichat_record_wait_seconds", values)
    for value in values:
        single.observe("minichat_record_wait_seconds", [value])

    def histogram(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {k: v for k, v in samples(m.render()).items() if k[0].startswith("minichat_record_wait")}

    assert histogram(bulk) == pytest.approx(histogram(single))
    assert histogram(bulk)[("minichat_record_wait_seconds_count", ())] == len(values)
