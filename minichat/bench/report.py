"""The bench's results as one JSON document and as plain-text tables (counts only, no content)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minichat.bench.ceiling import CeilingResult
from minichat.bench.client_overhead import OverheadResult
from minichat.bench.cost import Cost, cost_json, idle_json
from minichat.bench.drain import DrainResult
from minichat.bench.latency import EVENTS_PER_REQUEST, LatencyResult, RateResult
from minichat.bench.options import TENANTS
from minichat.bench.rebuilds import RebuildRun

ROWS_PER_EVENT = 4


@dataclass
class BenchResult:
    started_at: str
    options: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, Any]
    settings: dict[str, Any]
    ceiling: CeilingResult | None = None
    drains: list[DrainResult] = field(default_factory=list)
    latency: LatencyResult | None = None
    replay: bool = False
    client: OverheadResult | None = None
    elapsed_s: float = 0.0
    bench_cpu_s: float = 0.0

    def ratio(self, events_per_s: float) -> float | None:
        ceiling = self.ceiling.events_per_s if self.ceiling else 0.0
        return round(events_per_s / ceiling, 4) if ceiling else None


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _ceiling_json(c: CeilingResult) -> dict[str, Any]:
    return {
        "events_per_round": c.events_per_round,
        "batch": c.batch,
        "connections": c.connections,
        "rounds_events_per_s": [_r(x, 0) for x in c.rounds],
        "events_per_s": _r(c.events_per_s, 0),
        "rows_per_s": _r(c.events_per_s * ROWS_PER_EVENT, 0),
        "spread": [_r(min(c.rounds), 0), _r(max(c.rounds), 0)] if c.rounds else [],
    }


def _rebuild_json(run: RebuildRun, result: BenchResult) -> dict[str, Any]:
    return {
        "records": run.records,
        "applied": run.applied,
        "seconds": _r(run.seconds, 2),
        "events_per_s": _r(run.events_per_s, 0),
        "ratio_to_ceiling": result.ratio(run.events_per_s),
        "wall_s": _r(run.wall_s, 2),
        "cpu_s": _r(run.cpu_s, 2),
        "digest": run.digest,
        "digest_equal": run.digest_equal,
    }


def _drain_json(d: DrainResult, result: BenchResult) -> dict[str, Any]:
    o, w, p = d.outcomes, d.drained, d.produced
    return {
        "workers": d.workers,
        "turns": p.turns,
        "events": p.events,
        "chats": p.chats,
        "users": p.users,
        "tenants": TENANTS,
        "chats_in_flight": p.in_flight,
        "backlog": {"seconds": _r(p.seconds, 2), "generator_cpu_s": _r(p.cpu_s, 2)},
        "startup_s": _r(w.startup_s, 2),
        "drain_s": _r(w.drain_s, 2),
        "events_per_s": _r(d.events_per_s, 0),
        "turns_per_s": _r(d.turns_per_s, 0),
        "ratio_to_ceiling": result.ratio(d.events_per_s),
        "worker_peak_rss_mib": [_r(k / 1024, 1) for k in w.peak_rss_kib],
        "worker_cpu_s": [_r(c, 2) for c in w.cpu_s],
        "worker_cpu_total_s": [_r(c, 2) for c in w.cpu_total_s],
        "worker_exit_codes": w.exit_codes,
        "decisions": o.decisions,
        "generation_in_progress": o.generation_in_progress,
        "generation_in_progress_share": round(o.generation_in_progress / p.turns, 4) if p.turns else None,
        "turns_stored": o.turns,
        "turns_settled": o.settled,
        "settled_estimated": o.estimated,
        "adjusted": o.adjusted,
        "events_dropped": w.dropped,
        "events_dropped_total": sum(w.dropped.values()),
        "events_parked_total": w.parked,
        "billing_published": w.billing_published,
        "billing_per_s": _r(w.billing_published / w.drain_s, 0) if w.drain_s > 0 else None,
        "billing_lag_ms": w.billing_lag_ms,
        "machine_busy": w.machine_busy,
        "watchdog_events": d.input_records - p.events,
        "digest_live": d.live_digest,
        "digest_rebuild": d.rebuild.digest,
        "digest_equal": d.rebuild.digest_equal,
        "rebuild": _rebuild_json(d.rebuild, result),
        "cost": _cost_json(d.cost, result),
    }


def _rate_json(r: RateResult, result: BenchResult) -> dict[str, Any]:
    events = r.decided_per_s * EVENTS_PER_REQUEST
    return {
        "offered_per_s": r.rate,
        "seconds": _r(r.seconds, 2),
        "sent": r.sent,
        "sent_per_s": _r(r.sent_per_s),
        "decided_per_s": _r(r.decided_per_s),
        "events_per_s": _r(events, 0),
        "ratio_to_ceiling": result.ratio(events),
        "latency_ms": r.latency_ms,
        "answered": r.answered,
        "outstanding_at_end": r.outstanding_at_end,
        "lag_at_end": r.lag_at_end,
        "catch_up_s": _r(r.catch_up_s, 2),
        "kept_up": r.kept_up,
        "decisions": r.decisions,
        "generation_in_progress": r.decisions.get("reject/generation_in_progress", 0),
        "worker_cpu_s": _r(r.worker_cpu_s, 2),
        "generator_cpu_s": _r(r.generator_cpu_s, 2),
        "broker_cpu_s": r.stack_cpu_s.get("broker"),
        "postgres_cpu_s": r.stack_cpu_s.get("postgres"),
        "machine_busy": r.machine_busy,
        "requests_behind_their_chat": r.behind,
        "worker_stages_ms": r.worker_stages,
        "cost": _cost_json(r.cost, result),
    }


def _cost_json(cost: Cost | None, result: BenchResult) -> dict[str, Any] | None:
    """`cost.cost_json`, with the worker's µs per event also per ms of the calibration's Python loop
    (a figure that travels between machines better)."""
    if cost is None:
        return None
    doc = cost_json(cost)
    loop_ms = (result.machine.get("calibration") or {}).get("python_sum_range_1e7_ms")
    per_event = doc["worker_cpu_us_per_event"]
    doc["worker_cpu_us_per_event_per_calibration_ms"] = (
        round(per_event / loop_ms, 4) if per_event is not None and loop_ms else None
    )
    return doc


def to_json(result: BenchResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "started_at": result.started_at,
        "elapsed_s": _r(result.elapsed_s),
        "options": result.options,
        "machine": result.machine,
        "versions": result.versions,
        "settings": result.settings,
        "ceiling": _ceiling_json(result.ceiling) if result.ceiling else None,
        "drain": [_drain_json(d, result) for d in result.drains],
        "latency": None,
        "replay": None,
        "client": None,
        "generator": {"bench_process_cpu_s": _r(result.bench_cpu_s, 2)},
    }
    if result.latency is not None:
        lat = result.latency
        doc["latency"] = {
            "chats": lat.chats,
            "users": lat.users,
            "start_s": _r(lat.start_s, 2),
            "rates": [_rate_json(r, result) for r in lat.rates],
            "idle": idle_json(lat.idle) if lat.idle is not None else None,
            "skipped_rates": lat.skipped,
        }
    if result.client is not None:
        doc["client"] = [
            {
                "instances": r.instances,
                "requests": r.requests,
                "client_ms": r.client_ms,
                "raw_ms": r.raw_ms,
                "overhead_ms": {
                    k: round(r.client_ms[k] - r.raw_ms[k], 3) for k in r.client_ms if k in r.raw_ms
                },
                "client_partitions_read": r.client_partitions_read,
                "partitions": r.partitions,
            }
            for r in result.client.rounds
        ]
    first = result.drains[0] if result.drains else None
    if result.replay and first is not None and first.noop_rebuild is not None:
        doc["replay"] = {
            "drained": _rebuild_json(first.noop_rebuild, result),
            "empty": _rebuild_json(first.rebuild, result),
        }
    return doc
