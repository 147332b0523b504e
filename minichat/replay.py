"""`minichat replay`: the input topics again, through the worker's own processors.

What it does
------------
* Reads `turn-requests`, `provider-responses` and `usage` from the beginning (or from the first
  record at or after `--from-time`, found with `offsets_for_times`) up to the end offsets taken
  when it starts, then exits. No consumer group at all: partitions are assigned by hand and no
  offset is ever committed, and the workers' stored positions are neither read nor written.
* Stores the policy version first (`ensure_policy_version`), as the worker does at start: a
  replay into an empty, migrated database can then admit and settle.
* Reads `turn-decisions` first, up to its end offsets, into a temporary table: a command that has
  a recorded decision is applied as decided (decision, effective model, reserve, policy version);
  only a command with none is decided afresh. Quota rows are shared by a user's chats on every
  partition, so deciding again could differ from what the live workers decided.
* Merges the input partitions with the worker's own merge (`processors/merge.py`: one ordered
  stream per partition number, (timestamp, topic rank, offset)) and applies the merged batches
  with the worker's own handlers (`processors/batches.py`), one transaction per batch, all on one
  connection. Whatever they produce (decisions, dead letters) is counted, never sent. No watchdog
  and no outbox relay run; the billing outbox is written by the settlement transactions as
  usual, and is idempotent on its dedupe key, so a replay over the live database adds no billing
  event.

Counting (what the summary means)
---------------------------------
* `read`: records consumed in the range.
* `applied`: records that changed the state. A command is applied when its decision row is new
  after its batch (every command that changes anything stores its decision in the same
  transaction). A provider or usage event is applied when its turn's row (every covered column of
  `chat_turns`, as the digest sees it) changed in its batch; several events of one turn in one
  batch all count as applied when the turn changed, so this is exact at zero (a replay over the
  live database) and an upper bound otherwise.
* `already applied`: records that changed nothing (already applied, or a no-op such as a second
  terminal event or an event of a rejected request).
* `parked`: provider and usage events whose command was not decided when they were processed;
  they are applied when the command is decided later in the replay. `still parked` is the
  number of rows of `parked_events` at the end (and at the start): events whose command is not
  in the log range (e.g. with `--from-time`) stay parked.
* `dead-lettered`: records the worker dead-letters; counted, not re-sent.

Running it over the live database is a no-op for the state (digest unchanged, no outbox row
added). Run it when the workers have caught up with the log, or stopped: a record the workers have
not processed yet would be decided by the replay first, and the workers would then answer it
with `replay: true`. A warning names the number of such records when the workers' consumer group
is behind the end offsets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from minichat.domain.commands import command_id_of
from minichat.domain.turns import TurnEvent
from minichat.models.events import TurnRequestEvent
from minichat.models.policy import Policy, load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.batches import MergedBatches
from minichat.processors.engine import input_ranks
from minichat.processors.errors import RetryPolicy, with_retries
from minichat.processors.merge import OrderedMerge
from minichat.processors.pipeline import Decoded, Handler, isolating
from minichat.processors.records import Output, SourceRecord, source_record
from minichat.settings import Settings
from minichat.storage.db import connect
from minichat.storage.metrics import state_gauges
from minichat.storage.policies import ensure_policy_version
from minichat.storage.recorded import create_recorded, insert_recorded
from minichat.storage.replay import (
    decisions_present,
    parked_of_batch,
    turn_fingerprint_sql,
    turn_fingerprints,
)
from minichat.storage.schema import pending_migrations

logger = logging.getLogger(__name__)

E = TypeVar("E")
RecordId = tuple[str, int, int]
"""(topic, partition, offset)"""

APPLIED = "applied"
UNCHANGED = "unchanged"
PARKED = "parked"


class ReplaySetupError(RuntimeError):
    """Something the operator must fix first (schema, topics); the message names the command."""


@dataclass
class ReplaySummary:
    read: int = 0
    applied: int = 0
    already_applied: int = 0
    parked: int = 0
    dead_lettered: int = 0
    decisions_discarded: int = 0
    parked_at_start: int = 0
    parked_at_end: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    read_by_topic: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.read / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rate": round(self.rate, 1)}

    def lines(self) -> list[str]:
        return [
            f"replay: {self.read} records in {self.elapsed_s:.1f} s ({self.rate:.0f} records/s, "
            f"{self.batches} batches)",
            f"  applied          {self.applied:>9}  changed the state",
            f"  already applied  {self.already_applied:>9}  changed nothing",
            f"  parked           {self.parked:>9}  waited for their command "
            f"(still parked: {self.parked_at_end}, at start: {self.parked_at_start})",
            f"  dead-lettered    {self.dead_lettered:>9}  not re-sent",
            f"  decisions        {self.decisions_discarded:>9}  not re-sent",
        ]


# ------------------------------------------------------------------------------------ progress


class Progress:
    """A progress bar on a terminal; a line every few seconds otherwise (logs, CI)."""

    def __init__(self, total: int, stream: TextIO | None = None, *, interval_s: float | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.tty else 5.0)
        self.done = 0
        self.started = time.monotonic()
        self._shown = self.started

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._shown >= self.interval_s:
            self._shown = now
            self._show(now)

    def finish(self) -> None:
        self._show(time.monotonic(), final=True)

    def _show(self, now: float, *, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        text = f"{self.done}/{self.total} {share:4.0%}  {rate:,.0f} events/s"
        text += f"  {elapsed:.1f}s" if final else f"  ETA {left:.0f}s"
        if self.tty:
            width = 30
            filled = min(width, round(width * share))
            end = "\n" if final else ""
            self.stream.write(f"\rreplay [{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K{end}")
        else:
            self.stream.write(f"replay {text}\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------- counting


def _record_id(record: SourceRecord) -> RecordId:
    return (record.topic, record.partition, record.offset)


@dataclass
class CommandOutcomes:
    """Wraps the turn-requests handler: a command is applied when its decision row is new."""

    inner: Handler[TurnRequestEvent]
    outcomes: dict[RecordId, str] = field(default_factory=dict)

    async def __call__(
        self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnRequestEvent]]
    ) -> list[Output]:
        keys = [(d.event.tenant_id, d.event.chat_id, command_id_of(d.event)) for d in batch]
        unique = sorted(set(keys))
        before = await decisions_present(con, unique)
        outputs = await self.inner(con, batch)
        after = await decisions_present(con, unique)
        outcomes: dict[RecordId, str] = {}
        counted: set[tuple[uuid.UUID, uuid.UUID]] = set()
        for item, (_, chat_id, command_id) in zip(batch, keys, strict=True):
            key = (chat_id, command_id)
            new = key in after and key not in before and key not in counted
            counted.add(key)
            outcomes[_record_id(item.record)] = APPLIED if new else UNCHANGED
        self.outcomes.update(outcomes)  # reset per batch attempt by the caller
        return outputs


@dataclass
class TurnEventOutcomes:
    """Wraps a provider/usage handler: an event is applied when its turn's row changed in the batch
    (the row as the digest covers it), parked when it sits in `parked_events` after the batch."""

    inner: Handler[TurnEvent]
    turn_row_sql: str
    outcomes: dict[RecordId, str] = field(default_factory=dict)

    async def __call__(self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnEvent]]) -> list[Output]:
        turns = sorted({(d.event.tenant_id, d.event.chat_id, d.event.request_id) for d in batch})
        before = await turn_fingerprints(con, self.turn_row_sql, turns)
        outputs = await self.inner(con, batch)
        after = await turn_fingerprints(con, self.turn_row_sql, turns)
        keys = [(d.event.tenant_id, d.record.topic, d.record.partition, d.record.offset) for d in batch]
        parked = await parked_of_batch(con, keys)
        outcomes: dict[RecordId, str] = {}
        for item in batch:
            rid = _record_id(item.record)
            turn = (item.event.tenant_id, item.event.chat_id, item.event.request_id)
            if rid in parked:
                outcomes[rid] = PARKED
            elif after.get(turn) != before.get(turn):
                outcomes[rid] = APPLIED
            else:
                outcomes[rid] = UNCHANGED
        self.outcomes.update(outcomes)
        return outputs


# ----------------------------------------------------------------------------------------- replay


def parse_time(text: str) -> datetime:
    """RFC 3339 with an offset (`2025-01-31T12:00:00Z`); a time without an offset is refused."""
    value = datetime.fromisoformat(text.strip().upper())
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: write it as RFC 3339, e.g. 2025-01-31T12:00:00Z")
    return value


async def _topic_partitions(admin: Any, topics: Sequence[str]) -> list[TopicPartition]:
    described = {t["topic"]: t for t in await admin.describe_topics(list(topics))}
    missing = [
        topic
        for topic in topics
        if topic not in described or described[topic]["error_code"] != 0 or not described[topic]["partitions"]
    ]
    if missing:
        raise ReplaySetupError(f"topics missing: {', '.join(missing)}: run `minichat topics create`")
    return [
        TopicPartition(topic, p["partition"])
        for topic in topics
        for p in sorted(described[topic]["partitions"], key=lambda p: p["partition"])
    ]


async def _offset_ranges(
    consumer: Any, partitions: Sequence[TopicPartition], from_time: datetime | None
) -> dict[TopicPartition, tuple[int, int]]:
    """[start, end) of each partition: end offsets as of now, start at the beginning or at the
    first record whose timestamp is at or after `from_time`."""
    begin = await consumer.beginning_offsets(list(partitions))
    end = await consumer.end_offsets(list(partitions))
    start = dict(begin)
    if from_time is not None:
        ms = round(from_time.timestamp() * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, ms))
        for tp in partitions:
            hit = found.get(tp)
            start[tp] = max(begin[tp], hit.offset) if hit is not None else end[tp]
    return {tp: (start[tp], end[tp]) for tp in partitions}


async def _workers_behind(admin: Any, group_id: str, ranges: Mapping[TopicPartition, tuple[int, int]]) -> int:
    """Records of the range the workers' group has not committed yet (0 when it cannot tell)."""
    try:
        committed = await admin.list_consumer_group_offsets(group_id, partitions=list(ranges))
    except Exception as exc:  # informational only: a replay does not need the group
        logger.debug("could not read the offsets of group %s: %r", group_id, exc)
        return 0
    behind = 0
    for tp, (start, end) in ranges.items():
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        behind += max(0, end - max(start, done))
    return behind


async def run_replay(
    settings: Settings,
    *,
    from_time: datetime | None = None,
    progress: TextIO | None = None,
    show_progress: bool = True,
    check_workers: bool = True,
) -> ReplaySummary:
    """Replay the input topics into `settings.database_url`; see the module docstring.

    Raises `ReplaySetupError` (schema or topics missing), `PolicyError`, `PolicyConflict`.
    """
    names = TopicNames(settings.topic_prefix)
    topics = [names.turn_requests, names.provider_responses, names.usage]
    policy = load_policy(settings.policy_file)
    summary = ReplaySummary(read_by_topic=dict.fromkeys(topics, 0))
    started = time.monotonic()

    # One connection for everything: the recorded decisions live in a temporary table.
    con = await connect(settings)
    try:
        await _prepare(con, policy)
        summary.parked_at_start = (await state_gauges(con)).parked_events
        batches = build_batches(settings, policy, follow_recorded=True)
        commands = CommandOutcomes(batches.turn_requests)
        turn_events = TurnEventOutcomes(batches.turn_events, await turn_fingerprint_sql(con))
        wired = dataclasses.replace(batches, turn_requests=commands, turn_events=turn_events)
        replay = _Replay(con, wired, commands, turn_events, names, summary)

        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap_servers, client_id="minichat-replay-admin"
        )
        await admin.start()
        try:
            partitions = await _topic_partitions(admin, topics)
            decision_partitions = await _topic_partitions(admin, [names.turn_decisions])
            # One consumer per pass: aiokafka's fetcher dies when a consumer's assignment is
            # emptied and replaced (the replay then hung when turn-decisions was empty).
            async with _replay_consumer(settings, "decisions") as decisions:
                recorded = await _read_decisions(con, decisions, decision_partitions)
            logger.info("read %d recorded decisions of %s", recorded, names.turn_decisions)
            async with _replay_consumer(settings, "inputs") as consumer:
                ranges = await _offset_ranges(consumer, partitions, from_time)
                total = sum(max(0, end - start) for start, end in ranges.values())
                logger.info(
                    "replaying %d records of %s %s", total, ", ".join(topics),
                    f"from {from_time.isoformat()}" if from_time else "from the beginning",
                )  # fmt: skip
                behind = await _workers_behind(admin, settings.group_id, ranges) if check_workers else 0
                if behind:
                    logger.warning(
                        "the workers (group %s) have not committed %d record(s) of this range yet; if "
                        "they run on this database, let them catch up first: a record the replay "
                        "decides first is answered by them with replay: true",
                        settings.group_id,
                        behind,
                    )
                bar = Progress(total, progress) if show_progress else None
                await _merge_and_apply(consumer, ranges, replay, settings, bar)
                if bar is not None:
                    bar.finish()
        finally:
            await admin.close()
        summary.parked_at_end = (await state_gauges(con)).parked_events
    finally:
        await con.close()
    summary.elapsed_s = time.monotonic() - started
    return summary


async def _prepare(con: asyncpg.Connection, policy: Policy) -> None:
    pending = await pending_migrations(con)
    if pending:
        raise ReplaySetupError(
            f"the database schema is missing or old ({len(pending)} migration(s) pending): "
            "run `minichat db migrate`"
        )
    if await ensure_policy_version(con, policy):
        logger.info("stored policy version %d", policy.version)
    await create_recorded(con)


async def _read_decisions(
    con: asyncpg.Connection, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
) -> int:
    """Every `turn.decision` up to the end offsets taken now, into the temporary table."""
    ends = await consumer.end_offsets(list(partitions))
    starts = await consumer.beginning_offsets(list(partitions))
    todo = {tp for tp in partitions if starts[tp] < ends[tp]}
    consumer.assign(sorted(todo, key=lambda tp: tp.partition))
    for tp in todo:
        consumer.seek(tp, starts[tp])
    read = 0
    while todo:
        fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=5000)
        rows = []
        for tp, records in fetched.items():
            for record in records:
                if record.offset < ends[tp] and record.value is not None:
                    row = _decision_row(record.value)
                    if row is not None:
                        rows.append(row)
        await insert_recorded(con, rows)
        read += len(rows)
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)
    return read


@contextlib.asynccontextmanager
async def _replay_consumer(settings: Settings, purpose: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,  # no group: nothing is ever committed, the workers' group is untouched
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=f"minichat-replay-{purpose}",
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def _decision_row(value: bytes) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID, bool, dict[str, Any]] | None:
    """(tenant, chat, command id, replay, payload) of a turn-creating command's decision."""
    try:
        payload = json.loads(value)
        command = payload["command"]
        if command not in ("turn.requested", "turn.retry", "turn.edit") or payload.get("request_id") is None:
            return None
        replayed = bool(payload.pop("replay", False))
        return (
            uuid.UUID(payload["tenant_id"]),
            uuid.UUID(payload["chat_id"]),
            uuid.UUID(payload["request_id"]),
            replayed,
            payload,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("a record of turn-decisions is not a decision; ignored")
        return None


@dataclass
class _Replay:
    con: asyncpg.Connection
    batches: MergedBatches
    commands: CommandOutcomes
    turn_events: TurnEventOutcomes
    names: TopicNames
    summary: ReplaySummary

    async def apply(self, records: list[SourceRecord]) -> None:
        decoded = self.batches.decode(records)
        outputs: list[Output] = []
        outcomes: dict[RecordId, str] = {}

        async def commit(run: Sequence[int]) -> None:
            good = [d for i in run if isinstance(d := decoded[i], Decoded)]

            async def attempt() -> list[Output]:
                self.commands.outcomes = {}
                self.turn_events.outcomes = {}
                async with self.con.transaction():
                    return await self.batches.apply(self.con, good)

            outputs.extend(d for i in run if isinstance(d := decoded[i], Output))
            outputs.extend(await with_retries("replay batch", attempt, RetryPolicy(give_up_after_s=30.0)))
            outcomes.update({**self.commands.outcomes, **self.turn_events.outcomes})

        async def refuse(i: int, exc: BaseException) -> None:  # as the worker does (engine.py)
            outputs.append(self.batches.refused(records[i], exc))

        await isolating(list(range(len(records))), commit, refuse)
        dead_ids: set[RecordId] = set()
        for out in outputs:
            if out.topic == self.names.dead_letters:
                letter = json.loads(out.value)
                dead_ids.add((letter["source_topic"], letter["partition"], letter["offset"]))
            elif out.topic == self.names.turn_decisions:
                self.summary.decisions_discarded += 1
        self.summary.batches += 1
        for record in records:
            rid = _record_id(record)
            self.summary.read += 1
            self.summary.read_by_topic[record.topic] = self.summary.read_by_topic.get(record.topic, 0) + 1
            outcome = outcomes.get(rid, UNCHANGED)
            if rid in dead_ids:
                self.summary.dead_lettered += 1
            elif outcome == APPLIED:
                self.summary.applied += 1
            elif outcome == PARKED:
                self.summary.parked += 1
            else:
                self.summary.already_applied += 1


async def _merge_and_apply(
    consumer: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
    replay: _Replay,
    settings: Settings,
    bar: Progress | None,
) -> None:
    """The worker's merge, with every partition's frontier at +∞ once it reached its end offset."""
    merge = OrderedMerge(input_ranks(replay.names))
    active = {tp for tp, (start, end) in ranges.items() if start < end}
    consumer.assign(sorted(active, key=lambda tp: (tp.topic, tp.partition)))
    for tp, (start, _) in ranges.items():
        merge.open(tp.topic, tp.partition, start)
        if tp in active:
            consumer.seek(tp, start)
        else:
            merge.exhausted(tp.topic, tp.partition)
    while True:
        sizes = {tp: merge.buffered_of(tp.topic, tp.partition) for tp in active}
        total = sum(size_bytes for _, size_bytes in sizes.values())
        wanted = [  # the worker's bounds (`OrderedEngine._pace`): per lane in records, all in bytes
            tp
            for tp, (size, _) in sizes.items()
            if size < settings.lane_buffer_max and (size == 0 or total < settings.input_buffer_max_bytes)
        ]
        if wanted:
            fetched = await consumer.getmany(*wanted, timeout_ms=200, max_records=settings.batch_max)
            for tp, records in fetched.items():
                end = ranges[tp][1]
                merge.add(source_record(r) for r in records if r.offset < end)
            for tp in wanted:
                if await consumer.position(tp) >= ranges[tp][1]:
                    active.discard(tp)
                    consumer.pause(tp)
                    merge.exhausted(tp.topic, tp.partition)
        released = merge.release(settings.batch_max, settings.batch_max_bytes)
        if released:
            await replay.apply(released)
            if bar is not None:
                bar.advance(len(released))
        elif not active and merge.buffered() == 0:
            return
