"""`minichat bench` as CI runs it: a small run of every phase, so the instrument cannot rot.

Checks that every section is there with figures that agree with what was sent (the cost figures
present and above 0 where they must be), and that the bench removed its scratch databases and
topics. No speed is asserted anywhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.support import ROOT, Endpoints, worker_env

pytestmark = pytest.mark.integration

TURNS = 200
RATE = 50
RATE_SECONDS = 3
EVENTS_PER_TURN = 5
"""turn.requested, 2 x turn.progress, turn.completed, usage.reported."""


def _run_bench(endpoints: Endpoints, out: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "MINICHAT_KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka,
        "MINICHAT_DATABASE_URL": endpoints.database_url,
    }
    args = ["--turns", str(TURNS), "--rates", str(RATE), "--rate-seconds", str(RATE_SECONDS)]
    args += ["--workers", "1", "--ceiling-rounds", "1", "--client-requests", "5", "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-m", "minichat.cli", "bench", *args],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


def _check_drain(drain: dict[str, Any]) -> None:
    assert drain["workers"] == 1
    assert (drain["turns"], drain["events"]) == (TURNS, TURNS * EVENTS_PER_TURN)
    assert sum(drain["decisions"].values()) == TURNS  # one decision per command
    rejected = TURNS - drain["turns_stored"]
    assert drain["generation_in_progress"] == rejected  # the only refusal this traffic can get
    assert drain["turns_settled"] == drain["turns_stored"]
    # Each refused request's two progress events, completion and usage are counted as dropped.
    assert drain["events_dropped_total"] == 4 * rejected
    assert drain["worker_exit_codes"] == [0]
    # one billing event per settled turn, plus one per adjustment; the relay's lag is measured
    assert drain["billing_published"] == drain["turns_settled"] + drain["adjusted"]
    assert drain["billing_per_s"] > 0 and 0 < drain["billing_lag_ms"]["p50"] <= drain["billing_lag_ms"]["p99"]
    assert drain["events_per_s"] > 0 and drain["drain_s"] > 0
    assert all(rss > 0 for rss in drain["worker_peak_rss_mib"])
    assert all(cpu >= 0 for cpu in drain["worker_cpu_s"])
    assert re.fullmatch("[0-9a-f]{64}", drain["digest_live"])
    assert re.fullmatch("[0-9a-f]{64}", drain["digest_rebuild"])
    assert drain["digest_equal"] == (drain["digest_live"] == drain["digest_rebuild"])
    assert drain["rebuild"]["records"] == TURNS * EVENTS_PER_TURN + drain["watchdog_events"]
    _check_drain_cost(drain)


def _check_cpu(cost: dict[str, Any], local: bool) -> None:
    """CPU per event and per turn of every process, measured where it runs. `/proc` counts in
    10 ms ticks: over a window under a second (a 200-turn drain takes about 0.3 s) another
    process's share may be 0 ticks, so it must be measured there, and above 0 over longer ones."""
    assert cost["worker_cpu_us_per_event"] > 0 and cost["worker_cpu_us_per_turn"] > 0
    assert cost["generator_cpu_us_per_event"] >= 0
    long_enough = cost["window_s"] >= 1.0
    for name in ("postgres_cpu_us_per_event", "postgres_cpu_us_per_turn", "broker_cpu_us_per_event"):
        if local:
            assert cost[name] is not None and (cost[name] > 0 if long_enough else cost[name] >= 0), name
        else:
            assert cost[name] is None or cost[name] >= 0, name
    if local:
        # this database's own backends are part of all of PostgreSQL's processes
        assert 0 <= cost["postgres_database_cpu_us_per_event"] <= cost["postgres_cpu_us_per_event"]
        assert cost["worker_and_postgres_cpu_ms_per_turn"] > 0


def _check_drain_cost(drain: dict[str, Any]) -> None:
    cost = drain["cost"]
    assert (cost["events"], cost["turns"]) == (TURNS * EVENTS_PER_TURN, TURNS)
    _check_cpu(cost, local=cost["cpu_s"]["postgres"] is not None)
    assert cost["worker_cpu_us_per_event_per_calibration_ms"] > 0
    stmts = cost["statements_per_batch"]
    assert stmts["batches"] >= 1 and stmts["mean"] > 0
    assert stmts["mean_le_50"] is None or stmts["mean_le_50"] > 0
    # The rows are the worker's whole life, read once its sessions ended: exact.
    rows = cost["rows_per_turn"]
    assert rows["tables"]["chat_turns"]["inserted"] == round(drain["turns_stored"] / TURNS, 2)
    assert rows["tables"]["turn_decisions"]["inserted"] == 1.0  # one stored decision per command
    total = rows["total"]
    assert total["inserted"] > 0 and total["updated"] > 0 and 0 <= total["hot_updated"] <= total["updated"]
    assert total["written"] == pytest.approx(total["inserted"] + total["updated"], abs=0.011)
    assert cost["chat_turns_hot_share"] is None or 0 <= cost["chat_turns_hot_share"] <= 1


def _check_latency(latency: dict[str, Any], endpoints: Endpoints) -> None:
    [rate] = latency["rates"]
    assert rate["offered_per_s"] == RATE
    assert rate["sent"] == RATE * RATE_SECONDS
    assert rate["answered"] == rate["sent"]
    ms = rate["latency_ms"]
    assert 0 <= ms["p50"] <= ms["p95"] <= ms["p99"] <= ms["max"]
    assert rate["catch_up_s"] is not None
    assert sum(rate["decisions"].values()) == rate["sent"]
    # The broker and PostgreSQL served the rate: on this machine their processes used CPU.
    local = endpoints.kafka.startswith(("127.0.0.1:", "localhost:"))
    for service in ("broker_cpu_s", "postgres_cpu_s"):
        assert rate[service] > 0 if local else rate[service] is None or rate[service] >= 0, service
    cost = rate["cost"]
    assert (cost["events"], cost["turns"]) == (rate["sent"] * 3, rate["answered"])
    _check_cpu(cost, local)
    # every batch of this rate is small; its statements come from the worker's histogram
    stmts = cost["statements_per_batch"]
    assert stmts["batches"] >= 1 and stmts["batches_le_50"] >= 1 and stmts["mean_le_50"] > 0
    # a rate's rows are counted from its start to the worker's end: about one turn row per turn
    assert cost["rows_per_turn"]["tables"]["chat_turns"]["inserted"] == pytest.approx(1.0, abs=0.15)
    idle = latency["idle"]
    assert idle["seconds"] >= 9.9 and idle["worker_cpu_share_of_a_core"] > 0


async def _leftovers(endpoints: Endpoints, stderr: str) -> tuple[set[str], set[str]]:
    """Scratch databases and topics named in the bench's progress lines that still exist."""
    databases = set(re.findall(r"scratch database (minichat_bench_\w+)", stderr))
    prefixes = set(re.findall(r"scratch topics (bench\w+\.\w+\.)", stderr))
    assert databases and prefixes, stderr[-2000:]
    con = await asyncpg.connect(endpoints.database_url)
    try:
        rows = await con.fetch(
            "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", sorted(databases)
        )
    finally:
        await con.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=endpoints.kafka)
    await admin.start()
    try:
        topics = await admin.list_topics()
    finally:
        await admin.close()
    return {r["datname"] for r in rows}, {t for t in topics if t.startswith(tuple(prefixes))}


async def test_bench_smoke_run_reports_every_section(endpoints: Endpoints, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _run_bench(endpoints, out)
    assert result.returncode == 0, result.stderr[-4000:]
    doc = json.loads(out.read_text())

    assert doc["machine"]["cores"] >= 1 and doc["machine"]["memory_gib"] > 0
    assert doc["versions"]["postgresql"] and doc["versions"]["python"] and doc["versions"]["minichat"]
    assert {"batch_max", "partitions", "pg_fsync", "pg_synchronous_commit"} <= doc["settings"].keys()

    ceiling = doc["ceiling"]
    assert ceiling["events_per_round"] == TURNS and len(ceiling["rounds_events_per_s"]) == 1
    assert ceiling["events_per_s"] > 0

    [drain] = doc["drain"]
    _check_drain(drain)
    _check_latency(doc["latency"], endpoints)

    replay = doc["replay"]
    assert replay["drained"]["applied"] == 0 and replay["drained"]["digest_equal"] is True
    assert replay["drained"]["records"] == replay["empty"]["records"] == drain["rebuild"]["records"]
    assert doc["generator"]["bench_process_cpu_s"] > 0

    for heading in ("1. ceiling", "2. backlog drain", "3. decision latency", "4. replay"):
        assert heading in result.stdout
    assert "PostgreSQL CPU" in result.stdout and "broker CPU" in result.stdout
    assert "billing lag" in result.stdout and "the worker's own timings" in result.stdout
    assert "6. cost, the same run" in result.stdout and "idle worker over" in result.stdout
    assert "rows per turn by table" in result.stdout and "same-run ceiling" in result.stdout
    assert "5. client overhead" in result.stdout
    rounds = {r["instances"]: r for r in doc["client"]}
    assert set(rounds) == {1, 8} and rounds[8]["requests"] == 8 * 5
    for r in rounds.values():
        assert (
            0 < r["raw_ms"]["p50"] <= r["raw_ms"]["p99"]
            and 0 < r["client_ms"]["p50"] <= r["client_ms"]["p99"]
        )
        assert 1 <= r["client_partitions_read"] <= r["partitions"]
    assert await _leftovers(endpoints, result.stderr) == (set(), set())
