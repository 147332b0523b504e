"""What a phase cost, measured in the same run: CPU of every process per event and per decided turn,
rows PostgreSQL wrote per turn, statements per batch.

- CPU: the workers (/proc/<pid>/stat), the bench process itself (the generator and the probes:
  `time.process_time`), the broker and every PostgreSQL process (`procstat.py` says how processes
  that come and go are counted), read at the start and at the end of the phase.
- Rows: `pg_stat_user_tables` of the phase's scratch database, read before and after; the bench
  owns that database, so every row counted is the phase's (`storage.bench.table_writes` says when
  the counts arrive).
- Statements: the workers' `minichat_batch_statements` histograms, scraped before and after: the
  mean of all batches, and of batches of at most `SMALL_BATCH` records (its `records` label).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from minichat.bench.procstat import Reading, database_cpu_used, read_stat, stack_readings, stack_used
from minichat.storage.bench import TableWrites

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SMALL_BATCH: Final = 50
STATEMENTS: Final = "minichat_batch_statements"


@dataclass(frozen=True)
class Snapshot:
    at: float
    workers_s: tuple[float, ...]
    """CPU seconds so far of each worker."""
    bench_s: float
    stack: dict[str, Reading]


def snapshot(pids: Sequence[int]) -> Snapshot:
    """Everyone's CPU now: the workers `pids`, this process, the broker and PostgreSQL."""
    return Snapshot(
        time.monotonic(),
        tuple(read_stat(pid).own_s for pid in pids),
        time.process_time(),
        stack_readings(),
    )


@dataclass(frozen=True)
class CpuUsed:
    seconds: float
    """Wall time between the two snapshots."""
    worker_s: float
    """All workers together."""
    bench_s: float
    postgres_s: float | None
    """None: PostgreSQL does not run on this machine (likewise the broker)."""
    broker_s: float | None
    postgres_database_s: float | None = None
    """The phase database's own backends (`procstat.database_cpu_used`): PostgreSQL's CPU without
    what other users of a shared server made it do."""

    def share(self, cpu_s: float | None) -> float | None:
        """`cpu_s` as a share of one core over the window."""
        return None if cpu_s is None or self.seconds <= 0 else round(cpu_s / self.seconds, 4)


def cpu_between(before: Snapshot, after: Snapshot, database: str | None = None) -> CpuUsed:
    stack = stack_used(before.stack, after.stack)
    own = None
    if database is not None:
        own = database_cpu_used(before.stack["postgres"], after.stack["postgres"], database)
    return CpuUsed(
        seconds=after.at - before.at,
        worker_s=sum(after.workers_s) - sum(before.workers_s),
        bench_s=after.bench_s - before.bench_s,
        postgres_s=stack.get("postgres"),
        broker_s=stack.get("broker"),
        postgres_database_s=None if own is None else round(own, 3),
    )


@dataclass(frozen=True)
class StatementStats:
    batches: int
    statements: float
    small_batches: int
    """Batches of at most `SMALL_BATCH` records."""
    small_statements: float

    @property
    def mean(self) -> float | None:
        return self.statements / self.batches if self.batches else None

    @property
    def small_mean(self) -> float | None:
        return self.small_statements / self.small_batches if self.small_batches else None


def _statement_sums(scrapes: Sequence[Scrape]) -> dict[tuple[str, bool], float]:
    """(`sum` or `count`, small batch?) -> summed over the scrapes and the `records` labels."""
    out: dict[tuple[str, bool], float] = {}
    for scrape in scrapes:
        for (name, labels), value in scrape.items():
            kind = name.removeprefix(f"{STATEMENTS}_")
            if not name.startswith(f"{STATEMENTS}_") or kind not in ("sum", "count"):
                continue
            records = float(dict(labels).get("records", "+Inf"))
            key = (kind, records <= SMALL_BATCH)
            out[key] = out.get(key, 0.0) + value
    return out


def statement_stats(before: Sequence[Scrape], after: Sequence[Scrape]) -> StatementStats:
    """Statements per batch between two scrapes of the same workers (`before` empty: since they
    started)."""
    then, now = _statement_sums(before), _statement_sums(after)

    def delta(kind: str, small: bool) -> float:
        return now.get((kind, small), 0.0) - then.get((kind, small), 0.0)

    small_batches, small = int(delta("count", True)), delta("sum", True)
    return StatementStats(
        batches=small_batches + int(delta("count", False)),
        statements=small + delta("sum", False),
        small_batches=small_batches,
        small_statements=small,
    )


def writes_between(before: dict[str, TableWrites], after: dict[str, TableWrites]) -> dict[str, TableWrites]:
    """Per table, what was written between two readings (tables without a write left out)."""
    zero = TableWrites(0, 0, 0, 0)
    out: dict[str, TableWrites] = {}
    for name, now in sorted(after.items()):
        then = before.get(name, zero)
        delta = TableWrites(
            now.inserted - then.inserted,
            now.updated - then.updated,
            now.hot_updated - then.hot_updated,
            now.deleted - then.deleted,
        )
        if delta != zero:
            out[name] = delta
    return out


@dataclass(frozen=True)
class Cost:
    events: int
    """Input events the phase applied."""
    turns: int
    """Commands decided in the phase."""
    cpu: CpuUsed
    statements: StatementStats
    writes: dict[str, TableWrites] | None = field(default=None)
    """None: not read (the phase was cut short)."""


def _per(value: float | None, count: int, scale: float) -> float | None:
    return None if value is None or count <= 0 else round(value * scale / count, 2)


def _rows_json(writes: TableWrites, turns: int) -> dict[str, float | None]:
    return {
        "inserted": _per(writes.inserted, turns, 1),
        "updated": _per(writes.updated, turns, 1),
        "hot_updated": _per(writes.hot_updated, turns, 1),
        "deleted": _per(writes.deleted, turns, 1),
        "written": _per(writes.inserted + writes.updated, turns, 1),
    }


def total_writes(writes: dict[str, TableWrites]) -> TableWrites:
    return TableWrites(
        sum(w.inserted for w in writes.values()),
        sum(w.updated for w in writes.values()),
        sum(w.hot_updated for w in writes.values()),
        sum(w.deleted for w in writes.values()),
    )


def hot_share(writes: TableWrites | None) -> float | None:
    """HOT updates as a share of a table's updates (None without updates)."""
    return round(writes.hot_updated / writes.updated, 4) if writes and writes.updated else None


def cost_json(cost: Cost) -> dict[str, Any]:
    """The phase's cost as the bench's JSON reports it (µs per event and per decided turn)."""
    cpu, n, t = cost.cpu, cost.events, cost.turns
    both = None if cpu.postgres_s is None else cpu.worker_s + cpu.postgres_s
    out: dict[str, Any] = {
        "events": n,
        "turns": t,
        "window_s": round(cpu.seconds, 2),
        "cpu_s": {
            "worker": round(cpu.worker_s, 3),
            "postgres": cpu.postgres_s,
            "postgres_database": cpu.postgres_database_s,
            "broker": cpu.broker_s,
            "generator": round(cpu.bench_s, 3),
        },
        "cpu_share_of_a_core": {
            "worker": cpu.share(cpu.worker_s),
            "postgres": cpu.share(cpu.postgres_s),
            "broker": cpu.share(cpu.broker_s),
            "generator": cpu.share(cpu.bench_s),
        },
        "worker_cpu_us_per_event": _per(cpu.worker_s, n, 1e6),
        "worker_cpu_us_per_turn": _per(cpu.worker_s, t, 1e6),
        "postgres_cpu_us_per_event": _per(cpu.postgres_s, n, 1e6),
        "postgres_cpu_us_per_turn": _per(cpu.postgres_s, t, 1e6),
        "postgres_database_cpu_us_per_event": _per(cpu.postgres_database_s, n, 1e6),
        "broker_cpu_us_per_event": _per(cpu.broker_s, n, 1e6),
        "generator_cpu_us_per_event": _per(cpu.bench_s, n, 1e6),
        "worker_and_postgres_cpu_ms_per_turn": _per(both, t, 1e3),
        "statements_per_batch": {
            "batches": cost.statements.batches,
            "mean": _round(cost.statements.mean),
            f"batches_le_{SMALL_BATCH}": cost.statements.small_batches,
            f"mean_le_{SMALL_BATCH}": _round(cost.statements.small_mean),
        },
        "rows_per_turn": None,
        "chat_turns_hot_share": None,
    }
    if cost.writes is not None:
        out["rows_per_turn"] = {
            "total": _rows_json(total_writes(cost.writes), t),
            "tables": {name: _rows_json(w, t) for name, w in cost.writes.items()},
        }
        out["chat_turns_hot_share"] = hot_share(cost.writes.get("chat_turns"))
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def idle_json(cpu: CpuUsed) -> dict[str, Any]:
    """A running worker with no traffic: each process's CPU as a share of a core."""
    return {
        "seconds": round(cpu.seconds, 2),
        "worker_cpu_share_of_a_core": cpu.share(cpu.worker_s),
        "postgres_cpu_share_of_a_core": cpu.share(cpu.postgres_s),
        "postgres_database_cpu_share_of_a_core": cpu.share(cpu.postgres_database_s),
        "broker_cpu_share_of_a_core": cpu.share(cpu.broker_s),
    }
