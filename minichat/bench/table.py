"""The bench's JSON document as plain-text tables (what `minichat bench` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minichat.bench.workers import WORKER_STAGES


def grid(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])


def _pct(ratio: float | None) -> str | None:
    return None if ratio is None else f"{100 * ratio:.1f}%"


def _header(doc: dict[str, Any]) -> list[str]:
    m, v, s = doc["machine"], doc["versions"], doc["settings"]
    libs = " · ".join(f"{k} {x}" for k, x in v["libraries"].items())
    load = " ".join(str(x) for x in m["load_at_start"])
    cal = m["calibration"]
    return [
        f"minichat bench: {doc['started_at']}, {doc['elapsed_s']} s",
        f"machine   {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"load {load} at start",
        f"          sum(range(1e7)) {cal['python_sum_range_1e7_ms']} ms · TCP loopback round trip "
        f"{cal['tcp_loopback_round_trip_us']} us · PostgreSQL SELECT 1 {cal['pg_select_1_round_trip_us']} us",
        f"versions  minichat {v['minichat']} · Python {v['python']} · Kafka {v['kafka']} · "
        f"PostgreSQL {v['postgresql']} · {libs}",
        f"settings  partitions {s['partitions']} · batch_max {s['batch_max']} · lane_buffer_max "
        f"{s['lane_buffer_max']} · order_grace_ms {s['order_grace_ms']} · produce_in_flight "
        f"{s['produce_in_flight']} · fetch_max_wait_ms {s.get('fetch_max_wait_ms')} · db pool "
        f"{s['db_pool_min']}..{s['db_pool_max']} · relay "
        f"{s['relay_interval_s']} s/{s['relay_batch_max']} · log {s['log_level']}",
        f"          PostgreSQL fsync={s['pg_fsync']} synchronous_commit={s['pg_synchronous_commit']} "
        f"full_page_writes={s['pg_full_page_writes']} wal_level={s['pg_wal_level']} "
        f"shared_buffers={s['pg_shared_buffers']}",
    ]


def _ceiling(c: dict[str, Any]) -> list[str]:
    rounds = " ".join(str(int(x)) for x in c["rounds_events_per_s"])
    return [
        f"1. ceiling: admission-shaped writes (per event a turn row, a message row, the daily and monthly "
        f"`total` upserts), unnest batches of {c['batch']}, {c['connections']} connections",
        grid(
            ["events/round", "rounds (events/s)", "events/s", "rows/s"],
            [[c["events_per_round"], rounds, int(c["events_per_s"]), int(c["rows_per_s"])]],
        ),
    ]


def _drain(drains: list[dict[str, Any]]) -> list[str]:
    d0 = drains[0]
    rows = []
    for d in drains:
        gip = f"{d['generation_in_progress']} ({_pct(d['generation_in_progress_share'])})"
        rows.append(
            [
                d["workers"],
                int(d["events_per_s"]),
                int(d["turns_per_s"]),
                _pct(d["ratio_to_ceiling"]),
                d["drain_s"],
                d["startup_s"],
                "/".join(str(x) for x in d["worker_peak_rss_mib"]),
                "/".join(str(x) for x in d["worker_cpu_s"]),
                gip,
                d["events_dropped_total"],
                d["events_parked_total"],
                d["watchdog_events"],
                d.get("billing_per_s"),
                _pair(d.get("billing_lag_ms") or None),
                "yes" if d["digest_equal"] else "NO",
                _pct(d["machine_busy"]),
            ]
        )
    headers = ["workers", "events/s", "turns/s", "of ceiling", "drain s", "start s", "peak RSS MiB"]
    headers += ["worker CPU s", "gen_in_progress", "dropped", "parked", "watchdog", "billing/s"]
    headers += ["billing lag p50 / p99 ms", "digest = rebuild"]
    headers += ["machine busy"]
    return [
        f"2. backlog drain: {d0['turns']} turns = {d0['events']} events ({d0['chats']} chats, "
        f"{d0['users']} users, {d0['tenants']} tenants, {d0['chats_in_flight']} chats in flight while "
        "producing); timed from the first decision to quiescent",
        grid(headers, rows),
    ]


def _latency(lat: dict[str, Any]) -> list[str]:
    rows = []
    for r in lat["rates"]:
        ms = r["latency_ms"]
        cpu = [
            None if x is None else f"{100 * x / r['seconds']:.0f}%"
            for x in (r["worker_cpu_s"], r["generator_cpu_s"], r.get("broker_cpu_s"), r.get("postgres_cpu_s"))
        ]
        rows.append(
            [
                r["offered_per_s"],
                r["sent_per_s"],
                r["decided_per_s"],
                _pct(r["ratio_to_ceiling"]),
                *(ms.get(k) for k in ("p50", "p95", "p99", "max")),
                r["outstanding_at_end"],
                r["lag_at_end"],
                r["catch_up_s"],
                "yes" if r["kept_up"] else "NO",
                r["generation_in_progress"],
                *cpu,
                _pct(r["machine_busy"]),
            ]
        )
    headers = ["offered/s", "sent/s", "decided/s", "of ceiling", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    headers += ["undecided at end", "lag at end", "catch-up s", "kept up", "gen_in_progress"]
    headers += ["worker CPU", "bench CPU", "broker CPU", "PostgreSQL CPU", "machine busy"]
    lines = [
        f"3. decision latency: one worker, {lat['chats']} chats; per request turn.requested, then "
        "turn.completed + usage.reported once it is acked; latency = decision's append time - command's",
        grid(headers, rows),
    ]
    if lat["skipped_rates"]:
        lines.append(f"skipped rates (the worker never caught up before them): {lat['skipped_rates']}")
    stages = [(r["offered_per_s"], r.get("worker_stages_ms") or {}) for r in lat["rates"]]
    names = sorted({name for _, found in stages for name in found}, key=list(WORKER_STAGES).index)
    if names:
        lines.append(
            "the worker's own timings, p50 / p99 ms (histogram bucket bounds, up to the end of the catch-up)"
        )
        rows = [[rate, *(_pair(found.get(n)) for n in names)] for rate, found in stages]
        lines.append(grid(["offered/s", *names], rows))
    return lines


def _client(rounds: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in rounds:
        c, w, o = r["client_ms"], r["raw_ms"], r["overhead_ms"]
        rows.append(
            [
                r["instances"],
                r["requests"],
                f"{c['p50']:.1f} / {c['p99']:.1f}",
                f"{w['p50']:.1f} / {w['p99']:.1f}",
                f"{o['p50']:+.1f} / {o['p99']:+.1f}",
                f"{r['client_partitions_read']:g} of {r['partitions']}",
            ]
        )
    headers = ["instances", "requests", "client p50 / p99 ms", "raw p50 / p99 ms", "overhead ms"]
    headers.append("decision partitions read (client)")
    return [
        "5. client overhead: request_turn against a raw produce + consume of every decision partition, "
        "one request at a time per instance, each to a new chat (the decision time included in both)",
        grid(headers, rows),
    ]


def _pair(q: dict[str, float] | None) -> str | None:
    return None if q is None else f"{q['p50']:g} / {q['p99']:g}"


def _replay(rep: dict[str, Any]) -> list[str]:
    rows = []
    for name, run, verdict in (
        (
            "the drained database",
            rep["drained"],
            "unchanged" if rep["drained"]["digest_equal"] else "CHANGED",
        ),
        ("an empty database", rep["empty"], "= live" if rep["empty"]["digest_equal"] else "!= live"),
    ):
        rows.append(
            [name, run["records"], run["applied"], run["seconds"], int(run["events_per_s"]),
             _pct(run["ratio_to_ceiling"]), run["cpu_s"], verdict]
        )  # fmt: skip
    headers = ["replay into", "records", "applied", "seconds", "events/s", "of ceiling", "CPU s", "digest"]
    return ["4. replay (`minichat replay`, the first drain's topics)", grid(headers, rows)]


def render(doc: dict[str, Any]) -> str:
    from minichat.bench.cost_table import render_cost  # it uses `grid` of this module

    parts = ["\n".join(_header(doc))]
    if doc["ceiling"]:
        parts.append("\n".join(_ceiling(doc["ceiling"])))
    if doc["drain"]:
        parts.append("\n".join(_drain(doc["drain"])))
    if doc["latency"]:
        parts.append("\n".join(_latency(doc["latency"])))
    if doc["replay"]:
        parts.append("\n".join(_replay(doc["replay"])))
    if doc.get("client"):
        parts.append("\n".join(_client(doc["client"])))
    cost = render_cost(doc)
    if cost:
        parts.append("\n".join(cost))
    gen = [f"bench process (the generator and the probes): {doc['generator']['bench_process_cpu_s']} CPU s"]
    for d in doc["drain"]:
        b = d["backlog"]
        gen.append(
            f"  backlog for {d['workers']} worker(s): {d['events']} events in {b['seconds']} s, "
            f"{b['generator_cpu_s']} CPU s"
        )
    parts.append("\n".join(gen))
    return "\n\n".join(parts) + "\n"
