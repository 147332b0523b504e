"""The worker's histograms as Prometheus text, and the bench reading them back per stage."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from minichat.bench.workers import parse_metrics, stage_quantiles
from minichat.processors.metrics import BUCKETS_S, Metrics, records_label
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
    found = samples(m.render(gauges, {("turn_requests", 3): 17}))
    labels = (("command", "turn.requested"), ("decision", "allow"), ("error_code", ""), ("replay", "false"))
    assert found[("minichat_decisions_total", labels)] == 3
    assert found[("minichat_batch_size_records_bucket", (("le", "1000.0"),))] == 3
    assert found[("minichat_batch_size_records_bucket", (("le", "500.0"),))] == 1
    assert found[("minichat_outbox_oldest_age_seconds", ())] == 0.25
    assert found[("minichat_consumer_lag", (("partition", "3"), ("topic", "turn_requests")))] == 17
    assert ("process_resident_memory_bytes", ()) in found


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


def test_alerts_and_dashboard_name_only_metrics_the_worker_exports() -> None:
    """docs/alerts.yml and docs/grafana/minichat.json drift with the code: every minichat_* name
    they use is one the worker documents (a histogram's _bucket/_count/_sum included)."""
    import re
    from pathlib import Path

    import yaml

    from minichat.processors.metrics import _HELP

    docs = Path(__file__).resolve().parents[2] / "docs"
    rules = yaml.safe_load((docs / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    exprs.append((docs / "grafana" / "minichat.json").read_text())
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"minichat_[a-z_]+", e)}
    assert used and used <= set(_HELP), sorted(used - set(_HELP))
    assert {
        "minichat_consumer_lag",
        "minichat_decision_seconds",
        "minichat_outbox_oldest_age_seconds",
    } <= used


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
        if name == "minichat_batch_statements_sum"
    }
    assert by_label == {"1": 9, "50": 27, "100": 20, "+Inf": 40}
    assert found[("minichat_batch_statements_count", (("records", "50"),))] == 2
    assert found[("minichat_batch_statements_bucket", (("le", "12.0"), ("records", "50")))] == 1
