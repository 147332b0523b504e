"""Decision latency under offered load: one caught-up worker, `turn.requested` at fixed rates.

A rate's turns are built first (pydantic, not timed), then the pacer sends request i at
`start + i / rate` to the next chat of a pool of 2 x the highest rate, round robin; the chat's
`turn.completed` and `usage.reported` follow as soon as the request is acknowledged, and the chat
takes its next request only once those are acknowledged too. Per command, latency is its
`turn.decision`'s record timestamp minus its own (both LogAppendTime, ms; the command's from the
produce ack, so the producer's linger does not count). After each rate the worker is given time to
answer everything (lag 0) before the next one starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import asyncpg
from aiokafka import AIOKafkaConsumer

from minichat.bench.cost import Cost, CpuUsed, cpu_between, snapshot, statement_stats, writes_between
from minichat.bench.gateway import Gateway
from minichat.bench.options import BenchOptions
from minichat.bench.procstat import stack_readings, stack_used
from minichat.bench.progress import Ticker, say
from minichat.bench.scratch import database_name, deployment
from minichat.bench.traffic import Chat, Turn, make_turn, population
from minichat.bench.workers import (
    Worker,
    busy_share,
    cpu_times,
    running_workers,
    sample,
    stage_quantiles,
)
from minichat.kafka_security import kafka_client_options
from minichat.models.policy import CatalogModel
from minichat.settings import Settings
from minichat.storage.bench import TableWrites, table_writes, wait_for_no_sessions
from minichat.tasks import cancel_and_wait
from minichat.tools.kafka import InputLag, topic_partitions

EVENTS_PER_REQUEST = 3
"""turn.requested, turn.completed, usage.reported."""
WARM_UP_REQUESTS = 20
STATS_SETTLE_S = 11.0
KEPT_UP_S = 2.0


class DecisionClock:
    """Reads `turn-decisions` from the beginning: per `command_event_id`, the first decision's
    record timestamp (ms) and `decision/error_code`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
        self.decided: dict[str, tuple[int, str]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DecisionClock:
        topic = f"{self._settings.topic_prefix}turn-decisions"
        tps = (await topic_partitions(self._settings, [topic]))[topic]
        await self._consumer.start()
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run(), name="decision-clock")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await cancel_and_wait(self._task)
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            for records in batches.values():
                for record in records:
                    value = json.loads(record.value)
                    label = f"{value['decision']}/{value.get('error_code') or '-'}"
                    self.decided.setdefault(str(value["command_event_id"]), (int(record.timestamp), label))

    def check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # the reader died: raise its error


@dataclass
class Window:
    rate: int
    seconds: float
    """As asked; the window lasts longer when the generator falls behind (`elapsed_s`)."""
    start_ms: int
    end_ms: int = 0
    """When the last request of the window was handed to the producer."""
    commands: dict[str, int] = field(default_factory=dict)
    """command event id -> its record timestamp (ms)."""
    behind: int = 0
    """Requests whose chat still had its previous turn in flight when they were due."""

    @property
    def elapsed_s(self) -> float:
        return max(self.end_ms - self.start_ms, 1) / 1000


class Pacer:
    """Sends paced turns over a pool of chats, round robin; a chat has at most one turn in flight
    (its next request waits until the previous turn's facts are acknowledged)."""

    def __init__(self, gateway: Gateway, chats: tuple[Chat, ...], model: CatalogModel, seed: int) -> None:
        self.gateway = gateway
        self.chats = chats
        self.model = model
        self.seed = seed
        self.next = 0
        self.turns: Counter[int] = Counter()
        self.idle = {chat.index: asyncio.Event() for chat in chats}
        for event in self.idle.values():
            event.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.failures: list[BaseException] = []

    def plan(self, count: int) -> list[tuple[Chat, Turn]]:
        """The next `count` turns, built before the clock starts: building is not sending."""
        planned = []
        for _ in range(count):
            chat = self.chats[self.next % len(self.chats)]
            self.next += 1
            number = self.turns[chat.index]
            self.turns[chat.index] += 1
            planned.append((chat, make_turn(chat, number, self.model, progress=0, seed=self.seed)))
        return planned

    async def _turn(self, chat: Chat, turn: Turn, window: Window) -> None:
        try:
            window.commands[str(turn.event_id)] = await self.gateway.request(chat, turn)
            await self.gateway.facts(chat, turn)
        finally:
            self.idle[chat.index].set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            self.failures.append(failure)

    async def run(self, rate: int, seconds: float, planned: list[tuple[Chat, Turn]]) -> Window:
        """Request i of `planned` at `start + i / rate`; returns once every turn is acknowledged."""
        loop = asyncio.get_running_loop()
        window = Window(rate, seconds, start_ms=int(time.time() * 1000))
        started = loop.time()
        for i, (chat, turn) in enumerate(planned):
            await asyncio.sleep(max(0.0, started + i / rate - loop.time()))  # pacing
            idle = self.idle[chat.index]
            if not idle.is_set():
                window.behind += 1
                await asyncio.wait_for(idle.wait(), 60)
            idle.clear()
            task = asyncio.create_task(self._turn(chat, turn, window))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        window.end_ms = int(time.time() * 1000)
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 60)
        if self.failures:
            raise RuntimeError("a bench turn could not be produced") from self.failures[0]
        return window


@dataclass(frozen=True)
class RateResult:
    rate: int
    seconds: float
    """How long the rate actually ran: the asked seconds, more when the generator fell behind."""
    sent: int
    decided_in_window: int
    """Decisions of this rate's commands appended before the rate ended."""
    answered: int
    """Commands of this rate with a decision by the end of the catch-up."""
    latency_ms: dict[str, int]
    """p50, p95, p99, max over the answered commands (empty when none was answered)."""
    lag_at_end: int
    """Input records the worker's group had not committed when the rate ended."""
    catch_up_s: float | None
    """After the rate ended, until every command was answered and the lag was 0 (None: never)."""
    decisions: dict[str, int]
    worker_cpu_s: float
    generator_cpu_s: float
    machine_busy: float
    """Share of all cores busy while the rate ran (see `busy_share`)."""
    behind: int
    stack_cpu_s: dict[str, float | None] = field(default_factory=dict)
    """CPU seconds of the broker and of PostgreSQL while the rate ran (None: not on this machine)."""
    worker_stages: dict[str, dict[str, float]] = field(default_factory=dict)
    """The worker's own p50/p99 per stage (ms, histogram bucket bounds), see `WORKER_STAGES`."""
    cost: Cost | None = None
    """From the rate's start to the end of its catch-up; rows written up to the next rate's start."""

    @property
    def sent_per_s(self) -> float:
        return self.sent / self.seconds

    @property
    def decided_per_s(self) -> float:
        return self.decided_in_window / self.seconds

    @property
    def outstanding_at_end(self) -> int:
        return self.sent - self.decided_in_window

    @property
    def kept_up(self) -> bool:
        """Within 2 s of the rate's end every request of it was answered and the lag was 0: the
        backlog did not grow while the rate ran."""
        return self.catch_up_s is not None and self.catch_up_s <= KEPT_UP_S


@dataclass
class LatencyResult:
    chats: int
    users: int
    start_s: float
    """Worker start until the warm-up requests were answered and the lag was 0."""
    rates: list[RateResult] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Rates not run because the worker never caught up with an earlier one."""
    idle: CpuUsed | None = None
    """The caught-up worker with no traffic, before the first rate."""


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p95/p99 and the max of `values` (empty in, empty out)."""
    if not values:
        return {}
    ordered = sorted(values)
    rank = {p: ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in (50, 95, 99)}
    return {"p50": rank[50], "p95": rank[95], "p99": rank[99], "max": ordered[-1]}


def summarize(
    window: Window,
    clock: DecisionClock,
    lag_at_end: int,
    catch_up_s: float | None,
    cpu: tuple[float, float, float],
) -> RateResult:
    found = {c: clock.decided[c] for c in window.commands if c in clock.decided}
    return RateResult(
        rate=window.rate,
        seconds=window.elapsed_s,
        sent=len(window.commands),
        decided_in_window=sum(1 for ts, _ in found.values() if ts <= window.end_ms),
        answered=len(found),
        latency_ms=percentiles([ts - window.commands[c] for c, (ts, _) in found.items()]),
        lag_at_end=lag_at_end,
        catch_up_s=catch_up_s,
        decisions=dict(Counter(label for _, label in found.values())),
        worker_cpu_s=cpu[0],
        generator_cpu_s=cpu[1],
        machine_busy=cpu[2],
        behind=window.behind,
    )


async def _catch_up(
    window: Window, clock: DecisionClock, lag: InputLag, worker: Worker, within: float
) -> float | None:
    """Seconds until every command of `window` is answered and the lag is 0; None after `within`."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        worker.check_alive()
        clock.check()
        if all(c in clock.decided for c in window.commands) and await lag.measure() == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    return None


async def _one_rate(
    pacer: Pacer,
    clock: DecisionClock,
    lag: InputLag,
    worker: Worker,
    rate: int,
    options: BenchOptions,
    database: str,
) -> RateResult:
    planned = pacer.plan(max(1, round(rate * options.rate_seconds)))
    cpu_worker, cpu_bench, machine = sample(worker.pid).cpu_s, time.process_time(), cpu_times()
    cpu_stack, began = stack_readings(), snapshot([worker.pid])
    scrape = await worker.metrics()

    def describe() -> str:
        return f"{pacer.gateway.records} records acknowledged, {len(clock.decided)} decisions seen"

    async with Ticker(f"latency {rate}/s", describe):
        window = await pacer.run(rate, options.rate_seconds, planned)
        cpu = (
            sample(worker.pid).cpu_s - cpu_worker,
            time.process_time() - cpu_bench,
            busy_share(machine, cpu_times()),
        )
        stack_cpu_s = stack_used(cpu_stack, stack_readings())
        lag_at_end = await lag.measure()
        caught = await _catch_up(window, clock, lag, worker, options.catch_up_timeout_s)
    ended, scraped = snapshot([worker.pid]), await worker.metrics()
    summary = summarize(window, clock, lag_at_end, caught, cpu)
    cost = Cost(
        summary.sent * EVENTS_PER_REQUEST,
        summary.answered,
        cpu_between(began, ended, database),
        statement_stats([scrape], [scraped]),
    )
    result = dataclasses.replace(
        summary, worker_stages=stage_quantiles(scrape, scraped), stack_cpu_s=stack_cpu_s, cost=cost
    )
    p99 = result.latency_ms.get("p99")
    say(
        f"latency {rate}/s: sent {result.sent_per_s:.0f}/s, decided {result.decided_per_s:.0f}/s, "
        f"p99 {p99} ms, caught up after {caught if caught is None else round(caught, 1)} s"
    )
    return result


async def run_latency(
    base: Settings, policy_file: Path, model: CatalogModel, options: BenchOptions, workdir: Path
) -> LatencyResult:
    chats = max(50, 2 * max(options.rates))
    pop = population(chats, max(1, chats // 10), model, options.seed)
    result = LatencyResult(chats=chats, users=len(pop.users), start_s=0.0)
    async with deployment(base, "latency", policy_file) as settings:
        say(f"latency: one worker on {settings.topic_prefix}*, {chats} chats, rates {options.rates}")
        async with (
            running_workers(settings, 1, workdir) as workers,
            InputLag(settings) as lag,
            Gateway(settings, linger_ms=2) as gateway,
            DecisionClock(settings) as clock,
        ):
            started = time.monotonic()
            pacer = Pacer(gateway, pop.chats, model, options.seed)
            warm = await pacer.run(WARM_UP_REQUESTS, 1.0, pacer.plan(WARM_UP_REQUESTS))
            if await _catch_up(warm, clock, lag, workers[0], options.catch_up_timeout_s) is None:
                raise TimeoutError("the worker did not answer the warm-up requests")
            result.start_s = time.monotonic() - started
            database = database_name(settings.database_url)
            result.idle = await _idle(workers[0], options.idle_seconds, database)
            admin = await asyncpg.connect(settings.admin_url)
            try:
                readings: list[dict[str, TableWrites]] = []
                for i, rate in enumerate(options.rates):
                    readings.append(await table_writes(admin))
                    rate_result = await _one_rate(pacer, clock, lag, workers[0], rate, options, database)
                    result.rates.append(rate_result)
                    if rate_result.catch_up_s is None:
                        result.skipped = list(options.rates[i + 1 :])
                        break
                await workers[0].stop()
                readings.append(await table_writes(admin) if await wait_for_no_sessions(admin) else {})
            finally:
                await admin.close()
    result.rates = _with_writes(result.rates, readings)
    return result


async def _idle(worker: Worker, seconds: float, database: str) -> CpuUsed:
    """The worker, caught up, with no traffic for `seconds`: what it (and the stack) use idle.
    Then, up to `STATS_SETTLE_S` after the warm-up, nothing: an idle session reports its row
    counts to PostgreSQL's statistics within 10 s, and the first rate's rows must not include the
    warm-up's."""
    say(f"latency: the worker idle for {seconds:g} s")
    before = snapshot([worker.pid])
    await asyncio.sleep(seconds)
    idle = cpu_between(before, snapshot([worker.pid]), database)
    await asyncio.sleep(max(0.0, STATS_SETTLE_S - seconds))
    return idle


def _with_writes(rates: list[RateResult], readings: list[dict[str, TableWrites]]) -> list[RateResult]:
    """Each rate's rows: from its start to the next rate's start (the last: to the worker's end).
    A running worker's sessions report their counts about once a second, so up to a second of
    a rate's rows can be counted in the next one's."""
    out = []
    for i, rate in enumerate(rates):
        after = readings[i + 1] if i + 1 < len(readings) else {}
        writes = writes_between(readings[i], after) if after and rate.cost is not None else None
        cost = None if rate.cost is None else dataclasses.replace(rate.cost, writes=writes)
        out.append(dataclasses.replace(rate, cost=cost))
    return out
