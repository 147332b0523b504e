"""Dependency faults: PostgreSQL and Kafka restarted, or away for long, under a real worker process.

The module runs its own Kafka and PostgreSQL (`scripts/stack.sh up` in a temporary state dir on
free ports, reusing the main stack's jar cache), because it stops and restarts them: the stack
the other tests share is never touched. Each test has its own topics, group and database.

What must hold after a short outage: the worker process never exited, every command is answered
and none is decided twice (copies marked `replay: true` are allowed, gaps are not), every accepted
turn is settled once with its reserve released, and the log shows the retries without message
content (nor a busy loop's flood: aiokafka's is paced and client log lines are rate-limited).
After a long outage the worker exits with status 70 and a critical line naming the dependency,
and a worker started once the dependency is back processes everything that was pending.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError

from minichat.models.topics import TopicNames
from minichat.processors.errors import EXIT_FATAL, GaveUp, RetryPolicy, with_retries
from minichat.processors.outages import BrokerWatch, RepeatLimiter
from minichat.settings import Settings
from tests.conftest import Deployment, deployment_settings, stack_endpoints
from tests.gateway import Event, Gateway
from tests.support import (
    ROOT,
    Endpoints,
    TopicReader,
    WorkerProcess,
    database_url_for,
    run_worker,
    wait_until,
)

pytestmark = pytest.mark.integration

STACK = ROOT / "scripts" / "stack.sh"
# Every message text carries this marker; no log line of the worker may.
SECRET = "faults-secret-7f3a"
USAGE = {"input_tokens": 5, "output_tokens": 6}
CHARGE = 2 + 12  # gpt-5-mini: ceil(5 x 0.25) + ceil(6 x 2) micro-credits


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass
class PrivateStack:
    """A Kafka + PostgreSQL of this module only, driven through `scripts/stack.sh`."""

    env: dict[str, str]
    endpoints: Endpoints = field(init=False)
    timings: list[str] = field(default_factory=list)

    def run(self, *args: str) -> str:
        started = time.monotonic()
        result = subprocess.run(
            [str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=600, check=False
        )
        self.timings.append(f"{' '.join(args)} {time.monotonic() - started:.1f} s")
        if result.returncode != 0:
            raise AssertionError(f"scripts/stack.sh {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    async def stop_pg(self) -> None:
        await asyncio.to_thread(self.run, "stop-pg")

    async def stop_kafka(self) -> None:
        await asyncio.to_thread(self.run, "stop-kafka")

    async def start(self) -> None:
        """Start whatever is stopped (same data dir, same ports) and wait until it answers."""
        await asyncio.to_thread(self.run, "up")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    kafka_port, controller_port, pg_port = _free_ports(3)
    main_state = Path(os.environ.get("MINICHAT_STACK_DIR", ROOT / ".stack"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICHAT_")}
    env.update(
        MINICHAT_STACK_DIR=str(tmp_path_factory.mktemp("faults-stack")),
        MINICHAT_STACK_KAFKA_PORT=str(kafka_port),
        MINICHAT_STACK_KAFKA_CONTROLLER_PORT=str(controller_port),
        MINICHAT_STACK_PG_PORT=str(pg_port),
        # The jar cache of the main stack (filled there by the first run if it is missing).
        MINICHAT_STACK_KAFKA_LIBS=os.environ.get(
            "MINICHAT_STACK_KAFKA_LIBS", str(main_state / "kafka" / "libs")
        ),
    )
    for name in ("MINICHAT_STACK_MVN_ARGS", "MINICHAT_STACK_PG_BIN", "MINICHAT_STACK_TIMEOUT"):
        if name in os.environ:
            env[name] = os.environ[name]
    private = PrivateStack(env)
    try:
        out = private.run("up")
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in out.splitlines()
            if line.startswith("export ")
        )
        private.endpoints = stack_endpoints(exports)  # the admin login; workers use the runtime one
        yield private
    finally:
        private.run("down", "--purge")
        print(f"\nprivate stack: {', '.join(private.timings)}")


@dataclass
class Faulty:
    """One deployment on the private stack: its settings, worker processes, gateway and database."""

    settings: Settings
    env: dict[str, str]
    workdir: Path
    gateway: Gateway
    db: asyncpg.Pool
    exits: ExitStack
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self) -> WorkerProcess:
        path = self.workdir / f"worker-{len(self.workers)}.log"
        worker = self.exits.enter_context(run_worker(self.env, path))
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)


@asynccontextmanager
async def faulty(stack: PrivateStack, workdir: Path, **timings: float) -> AsyncIterator[Faulty]:
    """A migrated database and created topics on the private stack; `timings` are Settings fields."""
    from minichat.processors.topics import create_topics
    from minichat.storage.schema import migrate

    endpoints = stack.endpoints
    name = f"minichat_f_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(endpoints.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = database_url_for(endpoints.database_url, name)
    con = await asyncpg.connect(url)
    try:
        await migrate(con)
    finally:
        await con.close()
    settings = deployment_settings(endpoints, url)
    await create_topics(settings)
    env = Deployment(settings).env()
    # A restarted worker waits for the dead one's session to expire before it gets partitions.
    env.update(MINICHAT_SESSION_TIMEOUT_S="6", MINICHAT_RETRY_MAX_BACKOFF_S="0.5")
    env.update({f"MINICHAT_{key.upper()}": str(value) for key, value in timings.items()})
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        async with TopicReader(
            settings.kafka_bootstrap_servers, TopicNames(settings.topic_prefix).turn_decisions
        ) as reader:
            with ExitStack() as exits:
                deployment = Faulty(settings, env, workdir, Gateway(settings, reader), pool, exits)
                try:
                    yield deployment
                except BaseException:
                    print(deployment.logs()[-6000:])
                    raise
    finally:
        await pool.close()


async def send_turns(gateway: Gateway, count: int) -> list[Event]:
    """`count` new users each send one request; its completion (inline usage) follows at once."""
    commands = [
        gateway.requested(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), content=f"{SECRET} question {i}")
        for i in range(count)
    ]
    await gateway.send(*commands)
    await gateway.send_provider(
        *[gateway.provider("turn.completed", c, content=f"{SECRET} answer", usage=USAGE) for c in commands]
    )
    return commands


async def traffic(gateway: Gateway, sent: list[Event], stop: asyncio.Event, *, wave: int = 5) -> None:
    """Waves of turns until `stop` is set (a wave at most every 0.1 s)."""
    while not stop.is_set():
        sent.extend(await send_turns(gateway, wave))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.1)


async def all_settled(deployment: Faulty, commands: list[Event], *, timeout: float = 60) -> None:
    """Wait until every turn is settled and its billing event published, then check the totals."""
    db = deployment.db
    count = len(commands)

    async def done() -> bool:
        settled = await db.fetchval("SELECT count(*) FROM chat_turns WHERE settled_at IS NOT NULL")
        published = await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
        return bool(settled == count and published == count)

    await wait_until(done, timeout=timeout, what=f"{count} turns settled and billed")
    # Exactly once in the database: one decision, turn, user and assistant message, billing row.
    assert await db.fetchval("SELECT count(*) FROM turn_decisions") == count
    assert await db.fetchval("SELECT count(*) FROM turn_decisions WHERE decision = 'allow'") == count
    turns = await db.fetch("SELECT * FROM chat_turns")
    assert {t["request_id"] for t in turns} == {uuid.UUID(c["request_id"]) for c in commands}
    assert {(t["state"], t["settlement_method"], t["committed_credits_micro"]) for t in turns} == {
        ("completed", "actual", CHARGE)
    }
    assert await db.fetchval("SELECT count(*) FROM messages") == 2 * count
    assert await db.fetchval("SELECT count(*) FROM outbox") == count
    assert await db.fetchval("SELECT count(*) FROM parked_events") == 0
    quota = await db.fetch("SELECT reserved_credits_micro, spent_credits_micro, calls FROM quota_usage")
    assert len(quota) == 2 * count  # daily and monthly `total` of each user
    assert {(q["reserved_credits_micro"], q["spent_credits_micro"], q["calls"]) for q in quota} == {
        (0, CHARGE, 1)
    }


async def one_decision_each(deployment: Faulty, commands: list[Event]) -> Counter[str]:
    """Every command is answered, and never decided twice: at most one decision is not a replay.

    Copies are allowed when they say `replay: true` (a batch consumed again after a retry or a
    restart re-sends its stored decision) and agree with the first. A decision whose first send
    died with the worker reaches the gateway only as a replay. Returns the replays per command.
    """
    values = await deployment.gateway.answers(commands, timeout=30)
    by_command: dict[str, list[dict[str, Any]]] = {}
    for value in values:
        by_command.setdefault(value["command_event_id"], []).append(value)
    assert set(by_command) == {c["event_id"] for c in commands}
    for command_id, copies in by_command.items():
        assert sum(not v["replay"] for v in copies) <= 1, f"{command_id} decided twice"
        assert len({(v["decision"], v["turn_id"], v["reserved_credits_micro"]) for v in copies}) == 1
    return Counter({k: sum(v["replay"] for v in copies) for k, copies in by_command.items()})


def cpu_seconds(worker: WorkerProcess) -> float:
    """User + system CPU time of the worker process so far (all its threads)."""
    fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_clean_log(log: str) -> None:
    assert SECRET not in log, "no message content in the log"
    assert "CRITICAL" not in log


async def wait_exit(worker: WorkerProcess, *, timeout: float) -> int:
    async def exited() -> int | None:
        code = worker.proc.poll()
        return None if code is None else code + 1000  # truthy even for status 0

    return await wait_until(exited, timeout=timeout, what="the worker to exit") - 1000


async def first_turn(deployment: Faulty) -> list[Event]:
    """A turn through a new worker: it consumes, decides and settles."""
    commands = await send_turns(deployment.gateway, 1)
    await all_settled(deployment, commands)
    return commands


async def sent_at_least(sent: list[Event], count: int) -> bool:
    return len(sent) >= count


async def test_postgres_restart_under_traffic(stack: PrivateStack, tmp_path: Path) -> None:
    async with faulty(stack, tmp_path, retry_give_up_s=60) as deployment:
        worker = deployment.start_worker()
        commands = await first_turn(deployment)

        sent: list[Event] = []
        stop = asyncio.Event()
        sender = asyncio.create_task(traffic(deployment.gateway, sent, stop))
        await wait_until(lambda: sent_at_least(sent, 20), what="traffic flowing")
        down_at = time.monotonic()
        await stack.stop_pg()
        # The outage under test: PostgreSQL stays down for 3 s while commands keep arriving.
        await asyncio.sleep(3)
        await stack.start()
        outage = time.monotonic() - down_at
        more = len(sent) + 20
        await wait_until(lambda: sent_at_least(sent, more), what="traffic after the restart")
        stop.set()
        await sender
        commands += sent

        await all_settled(deployment, commands)
        replays = await one_decision_each(deployment, commands)
        assert worker.proc.poll() is None, "the worker survived the outage"
        log = worker.log()
        assert "batch failed on PostgreSQL" in log
        assert_clean_log(log)
        print(
            f"postgres down {outage:.1f} s; {len(commands)} turns; {sum(replays.values())} replayed decisions"
        )
        assert worker.terminate() == 0


async def test_kafka_restart_under_traffic(stack: PrivateStack, tmp_path: Path) -> None:
    async with faulty(stack, tmp_path, broker_give_up_s=60, broker_check_interval_s=1) as deployment:
        worker = deployment.start_worker()
        commands = await first_turn(deployment)

        # A burst the worker is still working through when the broker goes away.
        commands += await send_turns(deployment.gateway, 200)
        down_at, cpu_at = time.monotonic(), cpu_seconds(worker)
        await stack.stop_kafka()
        # The outage under test: the broker stays stopped for 5 s (then takes a few to start).
        await asyncio.sleep(5)
        await stack.start()
        outage = time.monotonic() - down_at
        cpu = (cpu_seconds(worker) - cpu_at) / outage
        # aiokafka's producer retries metadata without a pause while records wait for a leader:
        # a busy loop (a whole core, two log lines a millisecond) unless the worker paces it.
        assert cpu < 0.5, f"the worker used {cpu:.0%} of a core while Kafka was down"
        noise = sum(1 for line in worker.log().splitlines() if "[ERROR]" in line or "[WARNING]" in line)
        assert noise < 300, f"{noise} warning and error lines for a {outage:.0f} s outage"
        commands += await send_turns(deployment.gateway, 50)

        await all_settled(deployment, commands)
        replays = await one_decision_each(deployment, commands)
        assert worker.proc.poll() is None, "the worker survived the outage"

        async def recovery_logged() -> bool:  # the next probe after the restart says so
            return "reachable again after" in worker.log()

        await wait_until(recovery_logged, timeout=10, what="the broker watch to see Kafka again")
        log = worker.log()
        assert "Kafka at 127.0.0.1" in log and "unreachable for" in log
        assert_clean_log(log)
        print(
            f"kafka down {outage:.1f} s (worker cpu {cpu:.0%}, {noise} warning/error lines); "
            f"{len(commands)} turns; {sum(replays.values())} replayed decisions"
        )
        assert worker.terminate() == 0


async def test_long_postgres_outage_stops_the_worker_and_nothing_is_lost(
    stack: PrivateStack, tmp_path: Path
) -> None:
    async with faulty(stack, tmp_path, retry_give_up_s=5) as deployment:
        first = deployment.start_worker()
        commands = await first_turn(deployment)

        # No event arrives: only the leader timers (outbox relay, watchdog) notice the outage.
        down_at = time.monotonic()
        await stack.stop_pg()
        try:
            assert await wait_exit(first, timeout=30) == EXIT_FATAL
            gave_up = time.monotonic() - down_at
            assert 5 <= gave_up < 15, "gives up after retry_give_up_s, not before, not much later"
            [critical] = [line for line in first.log().splitlines() if "CRITICAL" in line]
            assert (
                "PostgreSQL still failing after" in critical and "stopping the worker (exit 70)" in critical
            )
            assert "outbox relay" in critical or "watchdog" in critical
            assert_clean_log(first.log().replace(critical, ""))
            # Commands arrive while nothing runs: they wait in Kafka.
            commands += await send_turns(deployment.gateway, 20)
        finally:
            await stack.start()

        second = deployment.start_worker()
        await all_settled(deployment, commands)
        replays = await one_decision_each(deployment, commands)
        assert_clean_log(second.log())
        print(f"gave up {gave_up:.1f} s after postgres stopped: {critical.split('] ', 3)[-1]}")
        print(f"restarted worker: {len(commands)} turns, {sum(replays.values())} replayed decisions")
        assert second.terminate() == 0


async def test_long_kafka_outage_stops_the_worker_and_nothing_is_lost(
    stack: PrivateStack, tmp_path: Path
) -> None:
    async with faulty(stack, tmp_path, broker_give_up_s=5, broker_check_interval_s=1) as deployment:
        first = deployment.start_worker()
        commands = await first_turn(deployment)

        # A burst the worker is still working through when the broker goes away for good.
        commands += await send_turns(deployment.gateway, 100)
        down_at = time.monotonic()
        await stack.stop_kafka()
        try:
            assert await wait_exit(first, timeout=30) == EXIT_FATAL
            gave_up = time.monotonic() - down_at
            assert 5 <= gave_up < 15, "gives up after broker_give_up_s, not before, not much later"
            [critical] = [line for line in first.log().splitlines() if "CRITICAL" in line]
            bootstrap = deployment.settings.kafka_bootstrap_servers
            assert f"Kafka at {bootstrap} unreachable for" in critical
            assert "stopping the worker (exit 70)" in critical
            assert_clean_log(first.log().replace(critical, ""))
        finally:
            await stack.start()

        second = deployment.start_worker()
        await all_settled(deployment, commands)
        replays = await one_decision_each(deployment, commands)
        assert_clean_log(second.log())
        print(f"gave up {gave_up:.1f} s after kafka stopped: {critical.split('] ', 3)[-1]}")
        print(f"restarted worker: {len(commands)} turns, {sum(replays.values())} replayed decisions")
        assert second.terminate() == 0


# The pieces the tests above rely on, without a stack.


async def test_with_retries_gives_up_on_time_and_names_the_dependency() -> None:
    policy = RetryPolicy(initial_s=0.01, max_backoff_s=0.05, give_up_after_s=0.3)

    async def refused() -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    async def no_broker() -> None:
        raise KafkaConnectionError("Connection at 127.0.0.1:9 closed")

    started = time.monotonic()
    with pytest.raises(
        GaveUp, match=r"^relay: PostgreSQL still failing after 0 s \(\d+ tries, last error Connection"
    ):
        await with_retries("relay", refused, policy)
    assert 0.3 <= time.monotonic() - started < 0.3 + 0.2  # the last backoff is cut to the budget
    with pytest.raises(GaveUp, match="Kafka still failing"):
        await with_retries("produce", no_broker, policy)

    async def bug() -> None:
        raise ValueError("not transient")

    with pytest.raises(ValueError):  # at once, no retry
        await with_retries("batch", bug, policy)


async def test_broker_watch_gives_up_after_continuous_failure_only() -> None:
    now = [0.0]
    answers: list[bool] = []

    async def probe() -> None:
        if not answers.pop(0):
            raise KafkaConnectionError("refused")

    watch = BrokerWatch("127.0.0.1:9", give_up_s=10, timeout_s=1, probe=probe, clock=lambda: now[0])
    answers += [False] * 3 + [True]
    for t in (0, 5, 9.9, 11):
        now[0] = t
        await watch.check()
    assert watch.down_since is None  # answered at 11 s: the count starts again
    answers += [False] * 3
    for t in (12, 20):
        now[0] = t
        assert await watch.check() is False
    now[0] = 22
    with pytest.raises(
        GaveUp, match=r"^Kafka at 127.0.0.1:9 unreachable for 10 s \(3 failed metadata requests"
    ):
        await watch.check()


async def test_broker_watch_probe_times_out() -> None:
    async def hangs() -> None:
        await asyncio.sleep(10)

    watch = BrokerWatch("127.0.0.1:9", give_up_s=0.01, timeout_s=0.05, probe=hangs)
    assert await watch.check() is False
    await asyncio.sleep(0.02)
    with pytest.raises(GaveUp, match="last error TimeoutError"):
        await watch.check()


def test_repeat_limiter_keeps_one_line_per_window_with_a_count() -> None:
    now = [0.0]
    limiter = RepeatLimiter(window_s=10, clock=lambda: now[0])

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", level, __file__, 1, msg, ("x",), None)

    passed = []
    for t in range(25):
        now[0] = t
        for msg in ("Unable connect to node %s", "Unable to update metadata from %s"):
            rec = record(msg)
            if limiter.filter(rec):
                passed.append((t, rec.getMessage()))
        assert limiter.filter(record("Discovered coordinator %s", logging.INFO))
    assert passed == [
        (0, "Unable connect to node x"),
        (0, "Unable to update metadata from x"),
        (10, "Unable connect to node x [9 more like this in the last 10 s]"),
        (10, "Unable to update metadata from x [9 more like this in the last 10 s]"),
        (20, "Unable connect to node x [9 more like this in the last 10 s]"),
        (20, "Unable to update metadata from x [9 more like this in the last 10 s]"),
    ]
