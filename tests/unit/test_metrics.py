"""The worker's histograms as Prometheus text, and the bench reading them back per stage."""

from __future__ import annotations

from minichat.bench.workers import parse_metrics, stage_quantiles
from minichat.processors.metrics import BUCKETS_S, Metrics


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    m = Metrics()
    m.observe("minichat_batch_seconds", [0.002, 0.02, 0.02, 40.0], stage="transaction")
    text = m.render()
    assert "# TYPE minichat_batch_seconds histogram" in text
    assert 'minichat_batch_seconds_bucket{stage="transaction",le="0.001"} 0' in text
    assert 'minichat_batch_seconds_bucket{stage="transaction",le="0.0025"} 1' in text
    assert 'minichat_batch_seconds_bucket{stage="transaction",le="0.025"} 3' in text
    assert 'minichat_batch_seconds_bucket{stage="transaction",le="30.0"} 3' in text
    assert 'minichat_batch_seconds_bucket{stage="transaction",le="+Inf"} 4' in text
    assert 'minichat_batch_seconds_count{stage="transaction"} 4' in text
    assert 'minichat_batch_seconds_sum{stage="transaction"} 40.042000' in text


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
    assert stages == {"decision": {"p50": 5.0, "p99": 250.0}}
    assert stage_quantiles(before, before) == {}
