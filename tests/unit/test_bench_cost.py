"""The bench's cost figures: /proc parsing, CPU of processes that come and go, row deltas, the
per-event and per-turn arithmetic, and the mean statements of small batches from a scrape."""

from __future__ import annotations

import os

import pytest

from minichat.bench.cost import (
    Cost,
    CpuUsed,
    StatementStats,
    cost_json,
    hot_share,
    statement_stats,
    total_writes,
    writes_between,
)
from minichat.bench.procstat import (
    CLOCK_TICKS,
    ProcStat,
    Reading,
    cpu_used,
    database_cpu_used,
    parse_stat,
    read_stat,
    stack_used,
)
from minichat.bench.workers import parse_metrics
from minichat.processors.metrics import Metrics, records_label
from minichat.storage.bench import TableWrites

# A postgres backend's stat line: the command name holds a space and a parenthesis.
STAT = (
    "4242 (postgres: x) S 100 4242 4242 0 -1 4194560 2000 0 0 0 "
    "250 50 30 20 20 0 1 0 12345 200000000 3000 18446744073709551615"
)


def test_parse_stat_reads_the_fields_after_the_last_parenthesis() -> None:
    stat = parse_stat(STAT)
    assert stat.comm == "postgres: x"
    assert stat.ppid == 100
    assert stat.own_s == pytest.approx(300 / CLOCK_TICKS)  # utime 250 + stime 50
    assert stat.children_s == pytest.approx(50 / CLOCK_TICKS)  # cutime 30 + cstime 20


def test_read_stat_of_this_process() -> None:
    assert read_stat(os.getpid()).ppid == os.getppid()


def _p(own: float, children: float = 0.0, ppid: int = 1) -> ProcStat:
    return ProcStat("postgres", ppid, own, children)


def test_a_backend_that_ended_is_counted_through_the_postmasters_children_time() -> None:
    postmaster = 100
    before = Reading(
        {postmaster: _p(10.0, 50.0), 201: _p(3.0, ppid=postmaster), 202: _p(1.0, ppid=postmaster)}
    )
    # 201 ran 2 s more, then ended and was reaped (its 5 s land in the postmaster's children's
    # time); 203 started, ran 0.5 s and ended; 204 started and is still running; 202 ran 0.25 s.
    after = Reading({postmaster: _p(10.1, 50.0 + 5.0 + 0.5), 202: _p(1.25, ppid=postmaster), 204: _p(0.75)})
    assert cpu_used(before, after) == pytest.approx(0.1 + 2.0 + 0.5 + 0.75 + 0.25)


def test_a_process_gone_with_its_parent_unread_is_not_subtracted() -> None:
    before = Reading({1: _p(1.0), 2: _p(4.0, ppid=99)})
    assert cpu_used(before, Reading({1: _p(1.5)})) == pytest.approx(0.5)


def test_a_service_not_on_this_machine_is_none() -> None:
    nothing = {"broker": Reading(), "postgres": Reading()}
    after = {"broker": Reading(), "postgres": Reading({7: _p(1.0)})}
    assert stack_used(nothing, after) == {"broker": None, "postgres": 1.0}


def test_database_cpu_counts_the_live_backends_of_that_database_only() -> None:
    before = Reading(
        {1: _p(1.0), 2: _p(2.0)}, {1: "postgres: u db_a 127.0.0.1(5) idle", 2: "postgres: u db_b"}
    )
    after = Reading(
        {1: _p(1.5), 2: _p(3.0), 3: _p(0.25)},
        {1: "postgres: u db_a 127.0.0.1(5) idle", 2: "postgres: u db_b", 3: "postgres: u db_a 1"},
    )
    assert database_cpu_used(before, after, "db_a") == pytest.approx(0.75)
    assert database_cpu_used(before, Reading(), "db_a") is None


def test_statements_per_batch_and_of_batches_of_at_most_50_records_between_two_scrapes() -> None:
    m = Metrics()
    m.observe("minichat_batch_statements", [30], records=records_label(2000))
    before = parse_metrics(m.render())
    for records, statements in ((1, 9), (10, 11), (50, 13), (51, 20), (2000, 100)):
        m.observe("minichat_batch_statements", [statements], records=records_label(records))
    after = parse_metrics(m.render())
    stats = statement_stats([before], [after])
    assert (stats.batches, stats.small_batches) == (5, 3)
    assert stats.mean == pytest.approx(153 / 5)
    assert stats.small_mean == pytest.approx(11.0)
    # two workers: their scrapes add up; nothing observed: no mean
    assert statement_stats([], [after, after]).batches == 12
    empty = statement_stats([after], [after])
    assert (empty.mean, empty.small_mean) == (None, None)


def test_writes_between_two_readings_per_table_and_in_total() -> None:
    before = {"chat_turns": TableWrites(10, 5, 1, 0), "quiet": TableWrites(3, 3, 3, 3)}
    after = {
        "chat_turns": TableWrites(110, 205, 181, 0),
        "quiet": TableWrites(3, 3, 3, 3),
        "outbox": TableWrites(100, 100, 0, 50),
    }
    delta = writes_between(before, after)
    assert delta == {"chat_turns": TableWrites(100, 200, 180, 0), "outbox": TableWrites(100, 100, 0, 50)}
    assert total_writes(delta) == TableWrites(200, 300, 180, 50)
    assert hot_share(delta["chat_turns"]) == 0.9
    assert hot_share(TableWrites(1, 0, 0, 0)) is None


def test_cost_per_event_and_per_turn() -> None:
    cpu = CpuUsed(
        seconds=10.0, worker_s=5.0, bench_s=0.5, postgres_s=4.0, broker_s=2.0, postgres_database_s=3.0
    )
    stats = StatementStats(batches=10, statements=200, small_batches=4, small_statements=40)
    writes = {"chat_turns": TableWrites(1000, 2000, 1800, 0), "messages": TableWrites(2000, 0, 0, 0)}
    doc = cost_json(Cost(events=5000, turns=1000, cpu=cpu, statements=stats, writes=writes))
    assert doc["worker_cpu_us_per_event"] == 1000.0
    assert doc["worker_cpu_us_per_turn"] == 5000.0
    assert doc["postgres_cpu_us_per_event"] == 800.0
    assert doc["postgres_database_cpu_us_per_event"] == 600.0
    assert doc["broker_cpu_us_per_event"] == 400.0
    assert doc["generator_cpu_us_per_event"] == 100.0
    assert doc["worker_and_postgres_cpu_ms_per_turn"] == 9.0
    assert doc["cpu_share_of_a_core"] == {"worker": 0.5, "postgres": 0.4, "broker": 0.2, "generator": 0.05}
    assert doc["statements_per_batch"] == {
        "batches": 10,
        "mean": 20.0,
        "batches_le_50": 4,
        "mean_le_50": 10.0,
    }
    assert doc["rows_per_turn"]["total"] == {
        "inserted": 3.0,
        "updated": 2.0,
        "hot_updated": 1.8,
        "deleted": 0.0,
        "written": 5.0,
    }
    assert doc["rows_per_turn"]["tables"]["messages"]["inserted"] == 2.0
    assert doc["chat_turns_hot_share"] == 0.9


def test_cost_without_postgres_or_rows_or_turns_reports_none() -> None:
    cpu = CpuUsed(seconds=0.0, worker_s=1.0, bench_s=0.0, postgres_s=None, broker_s=None)
    doc = cost_json(Cost(events=0, turns=0, cpu=cpu, statements=StatementStats(0, 0, 0, 0)))
    assert doc["worker_cpu_us_per_event"] is None and doc["postgres_cpu_us_per_event"] is None
    assert doc["worker_and_postgres_cpu_ms_per_turn"] is None
    assert doc["cpu_share_of_a_core"]["worker"] is None
    assert doc["rows_per_turn"] is None and doc["chat_turns_hot_share"] is None
