"""The cost section of the bench's tables: per phase (the drains, each latency rate) CPU per event
and per turn, rows written per turn, statements per batch; the idle worker; the ceiling."""

from __future__ import annotations

from typing import Any

from minichat.bench.table import grid


def _phases(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = [(f"drain, {d['workers']} worker(s)", d["cost"]) for d in doc["drain"] if d.get("cost")]
    for r in (doc.get("latency") or {}).get("rates", []):
        if r.get("cost"):
            found.append((f"{r['offered_per_s']} requests/s", r["cost"]))
    return found


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _rows(cost: dict[str, Any], key: str = "total", table: bool = False) -> str:
    rows = cost.get("rows_per_turn")
    found = (rows or {}).get("tables", {}).get(key) if table else (rows or {}).get("total")
    if not found:
        return "-"
    return "/".join(f"{found[k]:g}" for k in ("inserted", "updated", "hot_updated", "deleted"))


def _cpu_rows(phases: list[tuple[str, dict[str, Any]]]) -> list[list[object]]:
    out: list[list[object]] = []
    for name, c in phases:
        share = c["cpu_share_of_a_core"]
        stmts = c["statements_per_batch"]
        written = (c.get("rows_per_turn") or {}).get("total", {}).get("written")
        out.append(
            [
                name,
                c["events"],
                c["turns"],
                c["worker_cpu_us_per_event"],
                c["worker_cpu_us_per_turn"],
                c["postgres_cpu_us_per_event"],
                c["postgres_database_cpu_us_per_event"],
                c["broker_cpu_us_per_event"],
                c["generator_cpu_us_per_event"],
                c["worker_and_postgres_cpu_ms_per_turn"],
                written,
                _rows(c),
                _share(c["chat_turns_hot_share"]),
                f"{_dash(stmts['mean'])} ({stmts['batches']})",
                f"{_dash(stmts['mean_le_50'])} ({stmts['batches_le_50']})",
                " / ".join(_share(share[k]) for k in ("worker", "postgres", "broker", "generator")),
            ]
        )
    return out


def render_cost(doc: dict[str, Any]) -> list[str]:
    phases = _phases(doc)
    if not phases:
        return []
    headers = ["phase", "events", "turns", "worker us/event", "worker us/turn", "PG us/event"]
    headers += ["PG this db us/event"]
    headers += ["broker us/event", "generator us/event", "worker+PG ms/turn", "rows written/turn"]
    headers += ["rows ins/upd/hot/del per turn", "chat_turns HOT", "statements/batch (batches)"]
    headers += ["<= 50 records (batches)", "% of a core: worker / PG / broker / generator"]
    lines = [
        "6. cost, the same run: CPU from /proc (PostgreSQL: every postgres process, ended backends "
        "included; 'this db': the live backends of the phase's database), rows from "
        "pg_stat_user_tables, statements from the worker's minichat_batch_statements; drain from its "
        "first decision to quiescent, a rate from its start to the end of its catch-up",
        grid(headers, _cpu_rows(phases)),
    ]
    tables = sorted({t for _, c in phases for t in ((c.get("rows_per_turn") or {}).get("tables") or {})})
    if tables:
        lines.append("rows per turn by table, inserted/updated/HOT-updated/deleted")
        rows = [[t, *(_rows(c, t, table=True) for _, c in phases)] for t in tables]
        lines.append(grid(["table", *(name for name, _ in phases)], rows))
    idle = (doc.get("latency") or {}).get("idle")
    if idle:
        worker, pg, own, broker = (
            idle[f"{k}_cpu_share_of_a_core"] for k in ("worker", "postgres", "postgres_database", "broker")
        )
        lines.append(
            f"idle worker over {idle['seconds']} s (caught up, no traffic): worker {_share(worker)} of a "
            f"core, PostgreSQL {_share(pg)} (its backends of this database {_share(own)}), broker "
            f"{_share(broker)}"
        )
    ceiling = doc.get("ceiling")
    if ceiling:
        shares = ", ".join(f"{d['workers']} worker(s) {_share(d['ratio_to_ceiling'])}" for d in doc["drain"])
        lines.append(
            f"same-run ceiling {int(ceiling['events_per_s'])} events/s; the drain as a share of it: "
            f"{shares or '-'}"
        )
    return lines
