"""kill -9 loses nothing, and the log rebuilds the same books (docs/contract.md, "Guarantees"), measured.

Each test runs its own deployment (topics, consumer group, database) with a policy whose usage
grace and watchdog period are short (and the demo tenant's tiny limits, so the simulator's limit
user is refused), plays the gateway simulator's traffic (`run_simulation`, in-process, fixed
seeds) against real `minichat worker` processes, and meanwhile a killer task SIGKILLs one worker
at random moments and restarts it at once:

* a kill lands a random 0.5-3 s (seeded) after the restarted worker logged `engine resumed:` (it
  joined the group, sought its stored positions and resumed), so it hits a worker that is processing -
  often while it re-applies the batch the previous kill interrupted; one kill in five (seeded)
  does not wait for that line and hits a worker that is still starting or joining the group;
* the simulator plays rounds (seed, seed + 1, ...; fresh ids each round) until the killer is
  done, so every kill lands under load; after the last kill the worker stays up and the round
  in progress finishes.

With two workers (a consumer group of two) only worker 0 is killed: every kill and every restart
is a rebalance under load for the survivor too.

Then, once the deployment is quiescent and the workers stopped gracefully (exit 0):

1. the simulator's checks (`summarize`): every accepted turn stored and settled exactly once, no
   reserve held, one distinct `usage.settled` per settled turn and none missing (adjustments
   likewise), billed credits = stored charges, each quota `total` row's `spent` = the charges
   settled on it, nothing parked, nothing unpublished, no dead letter;
2. every command record on `turn-requests` has a decision on `turn-decisions`; a decision re-sent
   after a crash is the same decision with `replay: true`; no decision answers an unknown command;
   exactly one decision per command is stored;
3. digest equality: a second, empty, migrated database is rebuilt from the same topics by
   `run_rebuild` (the same workload, no worker, no kill): its digest must equal the live one, so the
   state does not depend on where the kills fell (on a difference the differing rows are listed);
4. a replay over the live database changes nothing: same digest, nothing applied, no row added,
   nothing produced.

Every check runs and the figures (kills, events processed, lost, duplicated, ...) are printed
(`pytest -s`) before one assertion lists every failure; when `MINICHAT_GUARANTEES_OUT` names a
file the figures are appended to it as one JSON line (`scripts/guarantees.sh` prints them as the
table of docs/guarantees.md), and when `MINICHAT_CRASH_LOGS` names a directory every worker
incarnation's log is copied there. A digest difference is reported row by row, with the input
records of the chats concerned and the workers' log lines (group, offsets, errors) around them.

Sizes: `MINICHAT_CRASH_KILLS` kills (default 5) in the CI versions. The soak versions (marker
`soak`; `make soak`) do at least 50 and bigger rounds; they run only when the `-m` expression
names `soak` (`pytest -m soak tests/integration/test_crash.py`) and are reported as skipped
otherwise, so a plain `pytest` / `make test` stays short.

Workers here run with `MINICHAT_SESSION_TIMEOUT_S=6` (the broker's minimum): a SIGKILLed member
leaves the group only when its session expires, and each kill would otherwise stall the group for
10 s. It changes how long a kill stalls processing, not what a kill may lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from minichat.models.topics import INPUT_TOPICS, TopicNames
from minichat.processors.engine import RESUMED
from minichat.processors.topics import create_topics
from minichat.settings import Settings
from minichat.storage.digest import DIGEST_TABLES, Digest, row_expression, table_spec
from minichat.tools.kafka import read_topic
from minichat.tools.rebuild import RebuildSummary, run_rebuild
from minichat.tools.simulator import DEMO_POLICY, SimulateOptions, SimulationResult, run_simulation
from minichat.tools.summary import Summary, render, summarize, wait_quiescent
from tests.conftest import Deployment, deployment_settings
from tests.gateway import policy_file
from tests.support import (
    Endpoints,
    WorkerProcess,
    db_digest,
    end_offsets,
    run_worker,
    scratch_database,
    wait_until,
)

pytestmark = pytest.mark.integration

KILLS_ENV = "MINICHAT_CRASH_KILLS"
REPORT_ENV = "MINICHAT_GUARANTEES_OUT"
LOGS_ENV = "MINICHAT_CRASH_LOGS"
CI_KILLS = 5
SOAK_MIN_KILLS = 50

PAUSE_S = (0.5, 3.0)
"""A kill lands this long (uniform, seeded) after the victim's restart was ready."""
START_KILL_SHARE = 0.2
"""Share of kills (seeded) that do not wait for the restarted worker to be ready."""
READY = RESUMED
"""The engine's line once the worker joined the group, sought its stored positions and resumed
(faust's own "Ready" comes before the engine joins the group)."""
READY_TIMEOUT = 90.0
SESSION_TIMEOUT_S = "6"

CI_ROUND = SimulateOptions(
    tenants=2,
    users_per_tenant=2,
    chats_per_user=2,
    turns_per_chat=3,
    seed=20261126,
    timeout=120.0,
    step_timeout=60.0,
    # A chat's next command goes out as soon as the broker acknowledged the previous turn's
    # terminal event (the simulator's default pace), however far behind the workers are.
)
SOAK_ROUND = dataclasses.replace(CI_ROUND, tenants=3, users_per_tenant=3, turns_per_chat=4)


def _kills_from_env() -> int:
    value = int(os.environ.get(KILLS_ENV) or CI_KILLS)
    if value < 1:
        raise ValueError(f"{KILLS_ENV} must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class Variant:
    name: str
    workers: int
    kills: int
    round: SimulateOptions
    killer_seed: int
    soak: bool = False
    worker_env: tuple[tuple[str, str], ...] = ()
    """Settings of this variant's workers (on top of the deployment's)."""

    @property
    def timeout(self) -> int:
        """Generous: a kill cycle is about 10 s (session expiry, start, pause)."""
        return 180 + 20 * self.kills


CI_KILL_COUNT = _kills_from_env()
SOAK_KILL_COUNT = max(SOAK_MIN_KILLS, CI_KILL_COUNT)

SPLIT_EVERY_BATCH = (("MINICHAT_APPLY_PARALLEL", "3"), ("MINICHAT_APPLY_PARALLEL_MIN", "2"))
"""The rounds are small: by default only a catch-up after a kill makes batches big enough to be
split into concurrent groups. The two-worker variants split every batch of two records or more, so
kills and rebalances land between groups' commits and the positions' commit."""

VARIANTS = [
    Variant("one-worker", 1, CI_KILL_COUNT, CI_ROUND, killer_seed=1),
    Variant("two-workers", 2, CI_KILL_COUNT, CI_ROUND, killer_seed=2, worker_env=SPLIT_EVERY_BATCH),
    Variant("soak-one-worker", 1, SOAK_KILL_COUNT, SOAK_ROUND, killer_seed=3, soak=True),
    Variant(
        "soak-two-workers",
        2,
        SOAK_KILL_COUNT,
        SOAK_ROUND,
        killer_seed=4,
        soak=True,
        worker_env=SPLIT_EVERY_BATCH,
    ),
]


def _param(variant: Variant) -> Any:
    marks = [pytest.mark.timeout(variant.timeout)]
    if variant.soak:
        marks.append(pytest.mark.soak)
    return pytest.param(variant, id=variant.name, marks=marks)


def soak_selected(config: pytest.Config) -> bool:
    """Soak tests run only when the `-m` expression names them (`-m soak`)."""
    return "soak" in (config.option.markexpr or "")


# ----------------------------------------------------------------------------------- deployment


@asynccontextmanager
async def fresh_database(endpoints: Endpoints, template_database: str, tag: str) -> AsyncIterator[str]:
    """A migrated database of its own (a copy of the session's template), dropped afterwards."""
    async with scratch_database(endpoints.database_url, tag, template=template_database) as url:
        yield url


def crash_policy(directory: Path) -> Path:
    """The packaged policy with a 2 s usage grace, a 1 s watchdog, and the demo tenant's limits."""
    demo = yaml.safe_load(DEMO_POLICY.read_text())
    return policy_file(directory, usage_grace_s=2, watchdog_interval_s=1, tenants=demo["tenants"])


class Fleet:
    """The deployment's worker processes; slot `i` holds the current incarnation of worker `i`.
    Every incarnation logs to its own file; all are SIGKILLed when the stack closes (a no-op for
    those already stopped)."""

    def __init__(self, env: dict[str, str], workdir: Path, stack: ExitStack, count: int) -> None:
        self.env = env
        self.workdir = workdir
        self.stack = stack
        self.incarnations = [0] * count
        self.logs: list[list[Path]] = [[] for _ in range(count)]
        self.workers: list[WorkerProcess] = []
        for i in range(count):
            self.workers.append(self._spawn(i))

    def _spawn(self, i: int) -> WorkerProcess:
        self.incarnations[i] += 1
        path = self.workdir / f"worker{i}-{self.incarnations[i]:03d}.log"
        self.logs[i].append(path)
        return self.stack.enter_context(run_worker(self.env, path))

    def restart(self, i: int) -> None:
        self.workers[i] = self._spawn(i)

    def kill(self, i: int) -> None:
        self.workers[i].kill()

    def ready(self, i: int) -> bool:
        return READY in self.workers[i].log()

    def check_alive(self) -> None:
        """A worker that exits without being killed is a failure in itself (status 70: fatal error)."""
        for i, worker in enumerate(self.workers):
            status = worker.proc.poll()
            if status is not None:
                raise AssertionError(
                    f"worker {i} (incarnation {self.incarnations[i]}) exited by itself with status "
                    f"{status}:\n{worker.log()[-4000:]}"
                )

    def stop(self) -> list[int]:
        """Graceful stop (SIGTERM) of every current incarnation; their exit statuses."""
        return [worker.terminate() for worker in self.workers]

    def tails(self, chars: int = 3000, previous: int = 2) -> str:
        """The end of the current incarnations' logs and of the last killed ones."""
        parts = []
        for i, paths in enumerate(self.logs):
            for path in paths[-(previous + 1) :]:
                text = path.read_text(errors="replace") if path.exists() else ""
                parts.append(f"----- {path.name} (worker {i}) -----\n{text[-chars:]}")
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------- killer


@dataclass
class KillLog:
    kills: int = 0
    during_start: int = 0
    pauses: list[float] = field(default_factory=list)
    restart_to_kill_s: list[float] = field(default_factory=list)
    at_ms: list[int] = field(default_factory=list)
    """Wall-clock time of each kill (ms since the epoch: comparable with LogAppendTime)."""
    ready_ms: list[int] = field(default_factory=list)
    """When the killer saw a (re)started victim ready (polled: up to 0.25 s late)."""


async def kill_repeatedly(fleet: Fleet, victim: int, kills: int, rng: random.Random, log: KillLog) -> None:
    """SIGKILL worker `victim` `kills` times at random moments, restarting it at once; then wait
    until its last incarnation is ready (it stays up)."""

    async def victim_ready() -> bool:
        fleet.check_alive()
        if not fleet.ready(victim):
            return False
        log.ready_ms.append(round(time.time() * 1000))
        return True

    started = time.monotonic()
    for n in range(kills):
        during_start = n > 0 and rng.random() < START_KILL_SHARE
        if not during_start:
            await wait_until(victim_ready, timeout=READY_TIMEOUT, what=f"worker {victim} to be ready")
        pause = rng.uniform(*PAUSE_S)
        # The random moment of the kill is the thing under test: a deliberate pause, not a wait
        # for a condition.
        await asyncio.sleep(pause)
        fleet.check_alive()
        fleet.kill(victim)
        log.at_ms.append(round(time.time() * 1000))
        log.restart_to_kill_s.append(time.monotonic() - started)
        fleet.restart(victim)
        started = time.monotonic()
        log.kills += 1
        log.during_start += int(during_start)
        log.pauses.append(pause)
    await wait_until(
        victim_ready, timeout=READY_TIMEOUT, what=f"worker {victim} to be ready after the last kill"
    )


async def play_rounds(
    settings: Settings, base: SimulateOptions, killer: asyncio.Task[None], err: io.StringIO
) -> list[SimulationResult]:
    """Simulator rounds (seed, seed + 1, ...) until the killer is done; the round in progress when
    it finishes is played to its end. A failing killer stops the round at once."""
    assert base.seed is not None
    results: list[SimulationResult] = []
    while True:
        options = dataclasses.replace(base, seed=base.seed + len(results))
        round_task = asyncio.create_task(run_simulation(settings, options, err=err))
        await asyncio.wait({round_task, killer}, return_when=asyncio.FIRST_COMPLETED)
        if killer.done() and killer.exception() is not None:
            round_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await round_task
            killer.result()  # raises the killer's error
        results.append(await round_task)
        if killer.done():
            return results


# -------------------------------------------------------------------------------------- checking


@dataclass
class DecisionCheck:
    command_records: int
    commands: int
    decisions: int
    unanswered: list[str]
    unknown: int
    first_answer_replayed: int
    """Commands sent once whose first decision already says `replay: true`: the worker died after
    committing the decision and before its produce was acknowledged, and the restarted worker
    re-sent the stored decision."""
    differing: list[str]
    """Commands whose decisions on the topic differ in anything but the `replay` flag, each with
    its answers in offset order."""

    @property
    def resent(self) -> int:
        return self.decisions - self.command_records


async def check_decisions(settings: Settings) -> DecisionCheck:
    names = TopicNames(settings.topic_prefix)
    commands = [json.loads(v) for _, v in await read_topic(settings, names.turn_requests) if v]
    decisions = [json.loads(v) for _, v in await read_topic(settings, names.turn_decisions) if v]
    sent = Counter(str(c["event_id"]) for c in commands)
    answered = Counter(str(d["command_event_id"]) for d in decisions)
    first: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    for d in decisions:  # one chat's decisions share a partition: offset order per command
        command = str(d["command_event_id"])
        first.setdefault(command, d)
        answers.setdefault(command, []).append(d)
    differing = [
        f"{command} ({seq[0]['command']}): "
        + " then ".join(f"{d['decision']}/{d['error_code'] or '-'}/replay={d['replay']}" for d in seq)
        for command, seq in sorted(answers.items())
        if any({**d, "replay": None} != {**seq[0], "replay": None} for d in seq)
    ]
    return DecisionCheck(
        command_records=len(commands),
        commands=len(sent),
        decisions=len(decisions),
        unanswered=sorted(e for e, n in sent.items() if answered[e] < n),
        unknown=sum(n for e, n in answered.items() if e not in sent),
        first_answer_replayed=sum(1 for e, n in sent.items() if n == 1 and first.get(e, {}).get("replay")),
        differing=differing,
    )


async def fetch_rows(url: str, table: str) -> dict[str, dict[str, Any]]:
    """A digest table's covered columns by primary key (as JSON text), with the digest's session."""
    con = await asyncpg.connect(url)
    try:
        async with con.transaction(isolation="repeatable_read", readonly=True):
            await con.execute("SET LOCAL TimeZone = 'UTC'")
            spec = await table_spec(con, table, DIGEST_TABLES[table])
            rows = await con.fetch(
                f"SELECT {row_expression(spec.order_by)} AS k, {row_expression(spec.columns)} AS v "
                f'FROM "{table}"'
            )
    finally:
        await con.close()
    result = {}
    for row in rows:
        values = json.loads(row["v"])  # {"f1": ..., "f2": ...} in column order
        result[row["k"]] = dict(zip(spec.columns, values.values(), strict=True))
    return result


REDACTED = frozenset({"content", "title", "error_detail"})
"""Columns whose values are message content or free text: named in a diff, never printed."""


def _show(column: str, value: Any) -> str:
    return "<redacted>" if column in REDACTED else json.dumps(value, sort_keys=True)


OUTCOME_COLUMNS = frozenset(
    {
        "state",
        "error_code",
        "usage_known",
        "progress_seq",
        "billing_outcome",
        "settlement_method",
        "input_tokens",
        "output_tokens",
        "deleted_at",
    }
)
"""A turn that differs in one of these ended differently: one side (live or rebuilt) did not apply
records the log holds for it, or applied others - not merely in another order. (A charge that
differs only because the reserve differs - an estimated settlement - is not counted here.)"""


@dataclass
class Comparison:
    """The live database against the one rebuilt from the log by a replay."""

    counts: dict[str, int] = field(default_factory=dict)
    """`table` -> rows that differ or exist on one side only; `table.column` (jsonb:
    `table.column.field`) -> rows in which that column differs."""
    lines: list[str] = field(default_factory=list)
    turns_ended_differently: set[str] = field(default_factory=set)
    """Turn ids (chat_turns rows on one side only, or differing in an `OUTCOME_COLUMNS` column)."""
    turns_otherwise_different: set[str] = field(default_factory=set)
    decisions_differing: set[tuple[str, str]] = field(default_factory=set)
    """(chat_id, command_id) of stored decisions that decided otherwise (decision or error code)."""


def _key(key: str) -> list[str]:
    return [str(v) for v in json.loads(key).values()]


async def compare(live_url: str, rebuilt_url: str, live: Digest, rebuilt: Digest) -> Comparison:
    result = Comparison()
    counts: Counter[str] = Counter()
    for table in DIGEST_TABLES:
        if live.tables.get(table) == rebuilt.tables.get(table):
            continue
        a, b = await fetch_rows(live_url, table), await fetch_rows(rebuilt_url, table)
        only_live, only_rebuilt = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        result.lines.append(
            f"table {table}: {len(a)} live rows, {len(b)} rebuilt; {len(only_live)} only live, "
            f"{len(only_rebuilt)} only rebuilt"
        )
        for side, keys in (("live", only_live), ("rebuilt", only_rebuilt)):
            counts[table] += len(keys)
            if keys:
                counts[f"{table}.<row only {side}>"] += len(keys)
            result.lines += [f"  only {side}: {k}" for k in keys[:10]]
            if table == "chat_turns":
                result.turns_ended_differently.update(_key(k)[0] for k in keys)
        shown = 0
        for key in sorted(a.keys() & b.keys()):
            x, y = a[key], b[key]
            if x == y:
                continue
            counts[table] += 1
            columns = [c for c in x if x[c] != y[c]]
            if table == "chat_turns":
                turn = _key(key)[0]
                if OUTCOME_COLUMNS & set(columns):
                    result.turns_ended_differently.add(turn)
                else:
                    result.turns_otherwise_different.add(turn)
            if table == "turn_decisions" and {"decision", "error_code"} & set(columns):
                chat, command = _key(key)
                result.decisions_differing.add((chat, command))
            shown += 1
            for column in columns:
                if isinstance(x[column], dict) and isinstance(y[column], dict):  # jsonb: fields only
                    for sub in sorted(x[column].keys() | y[column].keys()):
                        u, v = x[column].get(sub), y[column].get(sub)
                        if u != v:
                            counts[f"{table}.{column}.{sub}"] += 1
                            if shown <= 20:
                                result.lines.append(
                                    f"  {key} {column}.{sub}: live {_show(sub, u)}, rebuilt {_show(sub, v)}"
                                )
                else:
                    counts[f"{table}.{column}"] += 1
                    if shown <= 20:
                        result.lines.append(
                            f"  {key} {column}: live {_show(column, x[column])}, "
                            f"rebuilt {_show(column, y[column])}"
                        )
        result.lines.append(f"  {shown} row(s) differ")
    result.counts = dict(sorted(counts.items()))
    return result


async def chat_histories(
    settings: Settings, live_url: str, comparison: Comparison, limit: int = 12
) -> tuple[str, list[int]]:
    """The input records of the chats that differ, in append order, the records of the differing
    turns and commands marked `*` (topic, partition, offset, record time, type, request; never
    content); chats of turns that ended differently first. Also returns the record times of the
    marked records of turns that ended differently (to find the workers' log lines around them)."""
    ordered = [*sorted(comparison.turns_ended_differently), *sorted(comparison.turns_otherwise_different)]
    con = await asyncpg.connect(live_url)
    try:
        rows = await con.fetch(
            "SELECT id, chat_id, request_id, state, error_code, settlement_method FROM chat_turns "
            "WHERE id = ANY($1::uuid[])",
            [uuid.UUID(t) for t in ordered],
        )
    finally:
        await con.close()
    by_id = {str(r["id"]): r for r in rows}
    chats: dict[str, None] = {}
    marked: set[str] = set()
    ended_differently: set[str] = set()
    for chat, command in sorted(comparison.decisions_differing):
        chats[chat] = None
        marked.add(command)
        ended_differently.add(command)
    for turn in ordered:
        row = by_id.get(turn)
        if row is not None:
            chats[str(row["chat_id"])] = None
            marked.add(str(row["request_id"]))
            if turn in comparison.turns_ended_differently:
                ended_differently.add(str(row["request_id"]))
    wanted = dict.fromkeys(list(chats)[:limit])
    names = TopicNames(settings.topic_prefix)
    found: dict[str, list[tuple[int, str]]] = {chat: [] for chat in wanted}
    times: list[int] = []
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(names.full(t), p) for t in INPUT_TOPICS for p in range(settings.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if end[tp] > 0}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=200)).items():
                for record in records:
                    chat = (record.key or b"").decode(errors="replace")
                    if record.offset >= end[tp] or chat not in found:
                        continue
                    value = json.loads(record.value)
                    request = str(value.get("new_request_id") or value.get("request_id"))
                    mark = "*" if request in marked else " "
                    if request in ended_differently:
                        times.append(record.timestamp)
                    found[chat].append(
                        (
                            record.timestamp,
                            f"  {mark} t={record.timestamp} {tp.topic.removeprefix(names.prefix)}"
                            f"[{tp.partition}]@{record.offset} {value.get('type')} request {request[:8]}",
                        )
                    )
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    lines = [
        f"turn {r['id']} (chat {str(r['chat_id'])[:8]}, request {str(r['request_id'])[:8]}): live "
        f"{r['state']} {r['error_code'] or ''} settled {r['settlement_method']}"
        + (" - ENDED DIFFERENTLY" if str(r["id"]) in comparison.turns_ended_differently else "")
        for r in sorted(rows, key=lambda r: ordered.index(str(r["id"])))[:limit]
    ]
    lines += [
        f"decision of command {command[:8]} in chat {chat[:8]} differs"
        for chat, command in sorted(comparison.decisions_differing)
    ]
    for chat, records in found.items():
        lines.append(f"chat {chat}: input records in append order")
        lines += [text for _, text in sorted(records)]
    return "\n".join(lines), times


LOG_EVENTS = (
    "Ready",
    "assigned",
    "revok",
    "Seek",
    "Joined group",
    "generation",
    "Signal",
    "ERROR",
    "WARNING",
    "CRITICAL",
    "Traceback",
    "Heartbeat",
    "rebalanc",
    "commit",
)


def log_excerpt(paths: list[Path], around_ms: list[int], window_s: float = 8.0) -> str:
    """The workers' log lines about the group, offsets and errors within `window_s` of the given
    record times (worker log times are local time, as this process reads them)."""
    if not around_ms:
        return ""
    lo, hi = min(around_ms) / 1000 - window_s, max(around_ms) / 1000 + window_s
    lines: list[tuple[float, str]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("[20") or not any(word in line for word in LOG_EVENTS):
                continue
            try:
                at = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if lo <= at <= hi:
                lines.append((at, f"{path.name}: {line[:240]}"))
    return f"worker log lines from {lo * 1000:.0f} to {hi * 1000:.0f} ms:\n" + "\n".join(
        text for _, text in sorted(lines)
    )


async def table_counts(url: str) -> dict[str, int]:
    con = await asyncpg.connect(url)
    try:
        return {t: int(await con.fetchval(f'SELECT count(*) FROM "{t}"')) for t in DIGEST_TABLES}
    finally:
        await con.close()


# --------------------------------------------------------------------------------------- figures


@dataclass
class Figures:
    variant: str
    workers: int
    kills: int
    kills_during_start: int
    rounds: int
    seeds: list[int]
    events_processed: int
    """Records of the input topics (gateway traffic plus the watchdog's events), all consumed."""
    events_by_topic: dict[str, int]
    commands: int
    decisions_produced: int
    decisions_resent_after_crash: int
    first_answer_replayed: int
    accepted_turns: int
    settled_turns: int
    adjusted_turns: int
    billing_records: int
    billing_distinct: int
    charged_micro: int
    lost: int
    duplicated: int
    replays_identical_digest: int
    replays: int
    turns_ended_differently: int
    """Turns whose outcome differs between the live database and the rebuilt one (or that exist
    on one side only): one side did not apply, or applied other, records of the log."""
    decisions_differing: int
    """Stored decisions that differ in decision or error code, live vs rebuilt."""
    digest_differences: dict[str, int]
    """Live vs rebuilt by the replay: rows that differ per table, and per `table.column`."""
    failures: list[str]
    elapsed_s: float

    def lines(self) -> list[str]:
        return [
            f"crash[{self.variant}]: {self.kills} kills survived ({self.kills_during_start} during start-up) "
            f"of 1 of {self.workers} worker(s), {self.rounds} simulator round(s) (seeds {self.seeds})",
            f"crash[{self.variant}]: {self.events_processed} input events processed {self.events_by_topic}; "
            f"{self.commands} commands, {self.decisions_produced} decisions produced "
            f"({self.decisions_resent_after_crash} re-sent after a crash, "
            f"{self.first_answer_replayed} answered first by a re-send)",
            f"crash[{self.variant}]: {self.accepted_turns} accepted turns, "
            f"{self.settled_turns} settled once, "
            f"{self.adjusted_turns} adjusted; billing {self.billing_records} records, "
            f"{self.billing_distinct} distinct; lost {self.lost}, duplicated {self.duplicated}; "
            f"{self.replays_identical_digest}/{self.replays} replays with identical digest "
            f"({self.turns_ended_differently} turns ended differently, {self.decisions_differing} "
            f"decisions differ) {self.digest_differences or ''}; {self.elapsed_s:.0f}s",
            *(f"crash[{self.variant}]: FAILED: {f.splitlines()[0]}" for f in self.failures),
        ]


def publish(figures: Figures) -> None:
    for line in figures.lines():
        print(line)
    out = os.environ.get(REPORT_ENV)
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps(dataclasses.asdict(figures), sort_keys=True) + "\n")


def lost_and_duplicated(summary: Summary, decisions: DecisionCheck) -> tuple[int, int]:
    """What the books and the decision topic show. Lost: accepted turns not stored or not settled,
    settled turns or adjustments without their billing event, commands without a decision.
    Duplicated: billing events of no settled turn, quota rows whose `spent` is not the sum of
    their turns' charges, decisions of no command, commands answered with different decisions.
    A record the workers skipped but whose turn the watchdog later settled anyway is invisible
    here: the digest comparison reports it (`turns_ended_differently`)."""
    lost = (
        abs(summary.accepted_turns - summary.stored_turns)
        + (summary.stored_turns - summary.settled_turns)
        + summary.missing_billing
        + summary.missing_adjustments
        + len(decisions.unanswered)
    )
    duplicated = (
        summary.unexpected_billing
        + len(summary.quota_mismatches)
        + decisions.unknown
        + len(decisions.differing)
    )
    return lost, duplicated


def keep_logs(fleet: Fleet, variant: Variant) -> None:
    """Copy every worker log to `$MINICHAT_CRASH_LOGS/<variant>-<time>/` when that is set."""
    target = os.environ.get(LOGS_ENV)
    if not target:
        return
    directory = Path(target) / f"{variant.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    directory.mkdir(parents=True, exist_ok=True)
    for path in (p for paths in fleet.logs for p in paths):
        if path.exists():
            shutil.copy2(path, directory / path.name)
    print(f"crash[{variant.name}]: worker logs kept in {directory}")


# ------------------------------------------------------------------------------------------ test


@pytest.fixture
def variant_allowed(request: pytest.FixtureRequest) -> Iterator[None]:
    variant: Variant = request.node.callspec.params["variant"]
    if variant.soak and not soak_selected(request.config):
        pytest.skip("soak test: run it with `make soak` or `pytest -m soak tests/integration/test_crash.py`")
    yield


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
async def test_kill9_loses_nothing_and_replay_rebuilds_the_same_state(
    variant: Variant,
    variant_allowed: None,
    endpoints: Endpoints,
    template_database: str,
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    progress = io.StringIO()
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    async with (
        fresh_database(endpoints, template_database, "crash") as live_url,
        fresh_database(endpoints, template_database, "rebuilt") as rebuilt_url,
    ):
        settings = deployment_settings(endpoints, live_url, policy_file=crash_policy(tmp_path))
        names = TopicNames(settings.topic_prefix)
        await create_topics(settings)
        env = {
            **Deployment(settings).env(),
            "MINICHAT_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S,
            **dict(variant.worker_env),
        }
        kill_log = KillLog()
        with ExitStack() as stack:
            fleet = Fleet(env, tmp_path, stack, variant.workers)

            def report(*parts: object) -> str:
                return "\n\n".join([*map(str, parts), progress.getvalue()[-4000:], fleet.tails()])

            # -- traffic under kills
            killer = asyncio.create_task(
                kill_repeatedly(fleet, 0, variant.kills, random.Random(variant.killer_seed), kill_log)
            )
            try:
                results = await play_rounds(settings, variant.round, killer, progress)
                await killer
                fleet.check_alive()
            except BaseException:
                killer.cancel()
                print(report(f"traffic under kills failed after {kill_log.kills} kill(s)"))
                keep_logs(fleet, variant)
                raise
            check(kill_log.kills == variant.kills, f"{kill_log.kills} kills of {variant.kills}")
            failures.extend(f"simulator: {p}" for r in results for p in r.problems)

            # -- books: quiescent, every invariant of the simulator's summary, every command answered
            backlog = await wait_quiescent(settings, None, within=120)
            check(backlog.quiescent, f"not quiescent: {backlog.describe()}")
            summary = await summarize(settings)
            failures.extend(f"books: {f}" for f in summary.failures)
            check(summary.accepted_turns == summary.stored_turns == summary.settled_turns > 0, "turns")
            check(summary.reserved_credits_micro == 0, "reserves held")
            check(summary.settled_events == summary.settled_turns, "usage.settled != settled turns")
            check(summary.missing_billing == summary.unexpected_billing == 0, "billing missing/unexpected")
            check(summary.adjusted_events == summary.adjusted_turns, "usage.adjusted != adjusted turns")
            check(summary.unpublished_outbox == summary.parked_events == 0, "outbox or parked left")
            check(summary.dead_letters == 0, f"{summary.dead_letters} dead letter(s)")
            decisions = await check_decisions(settings)
            check(decisions.unanswered == [], f"commands without a decision: {decisions.unanswered[:10]}")
            check(decisions.unknown == 0, f"{decisions.unknown} decision(s) of no command")
            check(decisions.differing == [], f"commands answered differently: {decisions.differing[:10]}")
            stored = await table_counts(live_url)
            check(
                stored["turn_decisions"] == decisions.commands,
                f"{stored['turn_decisions']} stored decisions for {decisions.commands} commands",
            )

            # -- the workers stop gracefully after all that
            statuses = fleet.stop()
            check(statuses == [0] * variant.workers, f"exit statuses on SIGTERM: {statuses}")
            logs = fleet.tails()

        # -- digest equality: the same log replayed into an empty database, without kills
        live_digest = await db_digest(live_url)
        rebuilt_settings = settings.model_copy(update={"database_url": rebuilt_url})
        rebuild: RebuildSummary = await run_rebuild(rebuilt_settings, show_progress=False)
        rebuilt_digest = await db_digest(rebuilt_url)
        comparison = Comparison()
        if rebuilt_digest != live_digest:
            comparison = await compare(live_url, rebuilt_url, live_digest, rebuilt_digest)
            histories, times = await chat_histories(settings, live_url, comparison)
            failures.append(
                f"digest: the database rebuilt by a replay differs from the live one {comparison.counts}; "
                f"turns that ended differently: {len(comparison.turns_ended_differently)}, decisions "
                f"that differ: {len(comparison.decisions_differing)}\n"
                + "\n".join(comparison.lines)
                + f"\n{histories}\nkills at (ms since the epoch): {kill_log.at_ms}\nrestarted worker "
                f"ready at {kill_log.ready_ms}\n{log_excerpt([p for ps in fleet.logs for p in ps], times)}"
            )
        check(rebuild.dead_lettered == 0 and rebuild.parked_at_end == 0, f"rebuild: {rebuild}")

        # -- a replay over the live database changes nothing
        outputs = [names.turn_decisions, names.billing_usage, names.dead_letters]
        offsets_before, counts_before = await end_offsets(settings, outputs), await table_counts(live_url)
        again = await run_rebuild(settings, show_progress=False)
        again_digest = await db_digest(live_url)
        check(again.applied == 0, f"a replay over the live database applied {again.applied} record(s)")
        check(again_digest == live_digest, "a replay over the live database changed its digest")
        check(await table_counts(live_url) == counts_before, "a replay over the live database added rows")
        check(await end_offsets(settings, outputs) == offsets_before, "a replay produced records")

        inputs = await end_offsets(settings, [names.full(t) for t in INPUT_TOPICS])
        by_topic = {t: sum(n for tp, n in inputs.items() if tp.topic == names.full(t)) for t in INPUT_TOPICS}
        check(rebuild.read == again.read == sum(by_topic.values()), "a replay did not read the whole log")
        lost, duplicated = lost_and_duplicated(summary, decisions)
        keep_logs(fleet, variant)
        publish(
            Figures(
                variant=variant.name,
                workers=variant.workers,
                kills=kill_log.kills,
                kills_during_start=kill_log.during_start,
                rounds=len(results),
                seeds=[r.plan.seed for r in results],
                events_processed=sum(by_topic.values()),
                events_by_topic=by_topic,
                commands=decisions.commands,
                decisions_produced=decisions.decisions,
                decisions_resent_after_crash=decisions.resent,
                first_answer_replayed=decisions.first_answer_replayed,
                accepted_turns=summary.accepted_turns,
                settled_turns=summary.settled_turns,
                adjusted_turns=summary.adjusted_turns,
                billing_records=summary.billing_records,
                billing_distinct=summary.settled_events + summary.adjusted_events,
                charged_micro=summary.charged_micro,
                lost=lost,
                duplicated=duplicated,
                replays_identical_digest=int(rebuilt_digest == live_digest)
                + int(again_digest == live_digest),
                replays=2,
                digest_differences=comparison.counts,
                turns_ended_differently=len(comparison.turns_ended_differently),
                decisions_differing=len(comparison.decisions_differing),
                failures=failures,
                elapsed_s=time.monotonic() - began,
            )
        )
        check((lost, duplicated) == (0, 0), f"lost {lost}, duplicated {duplicated}")
        assert not failures, "\n\n".join([*failures, render(summary), progress.getvalue()[-4000:], logs])
