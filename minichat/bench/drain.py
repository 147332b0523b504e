"""Backlog drain: a backlog produced first, then worker process(es) started and timed until the
deployment is quiescent; then the correctness figures, the live digest and a rebuild.

The backlog is what gateways that wait for the answer send: each chat's next `turn.requested` is
produced only after the broker acknowledged every event of its previous turn (the command first,
then two `turn.progress`, `turn.completed` and `usage.reported` once the command is acked). Many
chats are in flight at once (`--in-flight`, default half of them, each played from its first turn
to its last), so the generator is fast; it runs before any worker starts. How close a chat's turns
lie in the log depends on that number, and the faust-agents engine's `generation_in_progress`
share with it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from minichat.bench.cost import (
    Cost,
    CpuUsed,
    Snapshot,
    StatementStats,
    cpu_between,
    snapshot,
    statement_stats,
    writes_between,
)
from minichat.bench.gateway import Gateway
from minichat.bench.options import BenchOptions
from minichat.bench.probe import Backlog, Outcomes, backlog, digest_of, input_records, outcomes
from minichat.bench.progress import Ticker, say
from minichat.bench.rebuilds import RebuildRun, rebuild_into_empty, rebuild_over_live
from minichat.bench.scratch import database_name, deployment
from minichat.bench.traffic import Chat, make_turn, population, sizes, turns_per_chat
from minichat.bench.workers import (
    Worker,
    busy_share,
    cpu_times,
    histogram_quantiles,
    metric_total,
    running_workers,
    sample,
)
from minichat.models.policy import CatalogModel
from minichat.settings import Settings
from minichat.storage.bench import TableWrites, table_writes, wait_for_no_sessions
from minichat.tools.kafka import InputLag

PROGRESS_EVENTS = 2
EVENTS_PER_TURN = 3 + PROGRESS_EVENTS
"""turn.requested, 2 x turn.progress, turn.completed, usage.reported."""


@dataclass(frozen=True)
class Produced:
    turns: int
    events: int
    chats: int
    users: int
    in_flight: int
    """Chats played at once."""
    seconds: float
    cpu_s: float
    """CPU of the bench process while it produced the backlog (the generator)."""


@dataclass
class Drained:
    """The workers' side of a drain."""

    startup_s: float
    """Worker start to the first stored decision."""
    drain_s: float
    """First stored decision to quiescent (every command decided, every turn settled, outbox
    empty, nothing parked, lag 0)."""
    peak_rss_kib: list[int]
    cpu_s: list[float]
    """Per worker, CPU seconds between the first decision and quiescence."""
    cpu_total_s: list[float]
    exit_codes: list[int]
    dropped: dict[str, int] = field(default_factory=dict)
    """`minichat_turn_events_dropped_total` by reason, summed over the workers."""
    parked: int = 0
    """`minichat_events_parked_total`, summed over the workers."""
    billing_published: int = 0
    """Billing events the relay published (acknowledged), summed over the workers."""
    billing_lag_ms: dict[str, float] = field(default_factory=dict)
    """p50/p99 of the relay's lag, outbox commit to acknowledged on billing-usage."""
    machine_busy: float = 0.0
    """Share of all cores busy during the drain (see `busy_share`)."""
    cpu: CpuUsed | None = None
    """Everyone's CPU from the first decision to quiescent."""
    statements: StatementStats | None = None
    """Statements per batch, all of the workers' batches."""
    writes: dict[str, TableWrites] | None = None
    """Rows written, workers' start to their end (None: their sessions outlived the wait)."""


@dataclass
class DrainResult:
    workers: int
    produced: Produced
    drained: Drained
    outcomes: Outcomes
    input_records: int
    """Records on the input topics at the end: the backlog plus whatever the watchdog wrote."""
    live_digest: str
    rebuild: RebuildRun
    noop_rebuild: RebuildRun | None = None

    @property
    def events_per_s(self) -> float:
        return self.produced.events / self.drained.drain_s if self.drained.drain_s > 0 else 0.0

    @property
    def turns_per_s(self) -> float:
        return self.produced.turns / self.drained.drain_s if self.drained.drain_s > 0 else 0.0

    @property
    def cost(self) -> Cost | None:
        d = self.drained
        if d.cpu is None or d.statements is None:
            return None
        return Cost(self.produced.events, self.produced.turns, d.cpu, d.statements, d.writes)


async def _play(
    gateway: Gateway, chat: Chat, turns: int, model: CatalogModel, seed: int, slots: asyncio.Semaphore
) -> None:
    async with slots:
        for number in range(turns):
            turn = make_turn(chat, number, model, progress=PROGRESS_EVENTS, seed=seed)
            await gateway.request(chat, turn)
            await gateway.facts(chat, turn)


async def produce_backlog(
    settings: Settings, model: CatalogModel, turns: int, seed: int, in_flight: int | None
) -> Produced:
    """The backlog; `in_flight` chats (default: half of them) are played at once, each from its
    first turn to its last."""
    chats, users = sizes(turns)
    pop = population(chats, users, model, seed)
    in_flight = min(in_flight or max(1, chats // 2), chats)
    slots = asyncio.Semaphore(in_flight)
    expected = turns * EVENTS_PER_TURN
    started, cpu = time.monotonic(), time.process_time()
    async with Gateway(settings, linger_ms=5) as gateway:

        def describe() -> str:
            return f"{gateway.records}/{expected} records acknowledged"

        async with Ticker("backlog", describe):
            await asyncio.gather(
                *(
                    _play(gateway, chat, n, model, seed, slots)
                    for chat, n in zip(pop.chats, turns_per_chat(turns, chats), strict=True)
                )
            )
        events = gateway.records
    return Produced(
        turns, events, chats, users, in_flight, time.monotonic() - started, time.process_time() - cpu
    )


async def _wait_quiescent(
    con: asyncpg.Connection, lag: InputLag, workers: list[Worker], commands: int, deadline_s: float
) -> Snapshot:
    """Poll (every 0.25 s) until quiescent; returns everyone's CPU at the first decision."""
    last: list[Backlog] = []  # the latest look, for the progress line
    first: Snapshot | None = None
    deadline = time.monotonic() + deadline_s
    async with Ticker(
        f"drain[{len(workers)} worker(s)]", lambda: last[-1].describe(commands) if last else "-"
    ):
        while True:
            for worker in workers:
                worker.check_alive()
            look = await backlog(con, lag)
            last[:] = [look]
            if first is None and look.decided:
                first = snapshot([w.pid for w in workers])
            if look.done(commands) and first is not None:
                return first
            if time.monotonic() > deadline:
                raise TimeoutError(f"not drained within {deadline_s:.0f}s: {look.describe(commands)}")
            await asyncio.sleep(0.25)


async def drain(settings: Settings, count: int, commands: int, deadline_s: float, workdir: Path) -> Drained:
    con = await asyncpg.connect(settings.database_url)
    admin = await asyncpg.connect(settings.admin_url)  # the statistics, no other session left open
    try:
        await wait_for_no_sessions(admin)  # the migration's counts are in
        writes_before = await table_writes(admin)
        async with running_workers(settings, count, workdir) as workers, InputLag(settings) as lag:
            spawned, machine_before = time.monotonic(), cpu_times()
            first = await _wait_quiescent(con, lag, workers, commands, deadline_s)
            done, machine_after = snapshot([w.pid for w in workers]), cpu_times()
            samples = [sample(w.pid) for w in workers]
            scrapes = [await w.metrics() for w in workers]
            codes = [await w.stop() for w in workers]
        await con.close()
        counted = await wait_for_no_sessions(admin)
        writes = writes_between(writes_before, await table_writes(admin)) if counted else None
    finally:
        await con.close()
        await admin.close()
    return Drained(
        startup_s=first.at - spawned,
        drain_s=done.at - first.at,
        peak_rss_kib=[s.peak_rss_kib for s in samples],
        cpu_s=[s.cpu_s - c for s, c in zip(samples, first.workers_s, strict=True)],
        cpu_total_s=[s.cpu_s for s in samples],
        exit_codes=codes,
        dropped=metric_total(scrapes, "minichat_turn_events_dropped_total"),
        parked=sum(metric_total(scrapes, "minichat_events_parked_total").values()),
        billing_published=sum(metric_total(scrapes, "minichat_billing_published_total").values()),
        billing_lag_ms=histogram_quantiles(scrapes, "minichat_billing_lag_seconds"),
        machine_busy=busy_share(machine_before, machine_after),
        cpu=cpu_between(first, done, database_name(settings.database_url)),
        statements=statement_stats([], scrapes),
        writes=writes,
    )


async def run_drain(
    base: Settings,
    policy_file: Path,
    model: CatalogModel,
    workers: int,
    options: BenchOptions,
    workdir: Path,
    *,
    noop_rebuild: bool,
) -> DrainResult:
    async with deployment(base, f"drain{workers}", policy_file) as settings:
        say(f"drain with {workers} worker(s): producing {options.turns} turns to {settings.topic_prefix}*")
        produced = await produce_backlog(settings, model, options.turns, options.seed, options.in_flight)
        say(
            f"backlog: {produced.events} events in {produced.seconds:.1f}s "
            f"({produced.cpu_s:.1f} CPU s); starting {workers} worker(s)"
        )
        deadline = options.drain_deadline_s(produced.events)
        drained = await drain(settings, workers, options.turns, deadline, workdir)
        say(f"drained in {drained.drain_s:.1f}s (+{drained.startup_s:.1f}s start); digest and rebuild")
        con = await asyncpg.connect(settings.database_url)
        try:
            found = await outcomes(con)
        finally:
            await con.close()
        live = await digest_of(settings)
        records = await input_records(settings)
        rebuilt = await rebuild_into_empty(settings, live, within=deadline)
        noop = await rebuild_over_live(settings, live, within=deadline) if noop_rebuild else None
    return DrainResult(workers, produced, drained, found, records, live, rebuilt, noop)
