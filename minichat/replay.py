"""`minichat replay`: the input topics again, through the worker's own processors.

What it does
------------
* Reads `turn-requests`, `provider-responses` and `usage` from the beginning (or from the first
  record at or after `--from-time`, found with `offsets_for_times`) up to the end offsets taken
  when it starts, then exits. No consumer group at all: partitions are assigned by hand and no
  offset is ever committed, so the workers' group is untouched.
* Stores the policy version first (`ensure_policy_version`), as the worker does at start: a
  replay into an empty, migrated database can then admit and settle.
* Feeds the records to the same `BatchProcessor`s as the worker (`build_processors`), one
  transaction per micro-batch (at most `batch_max` records, one topic). Whatever the processors
  produce (decisions, dead letters) goes to a producer that discards it and only counts it: no
  decision is re-sent, no dead letter is written twice. No watchdog and no outbox relay run; the
  billing outbox is written by the settlement transactions as usual, and is idempotent on its
  dedupe key, so a replay over the live database adds no billing event.

Order (decided)
---------------
The three topics are merged by record timestamp (LogAppendTime: the order the broker appended
them, which is the order a worker that keeps up processes them): a k-way merge on
`(timestamp, topic rank, partition, offset)`, topic rank turn-requests < provider-responses <
usage for records of the same millisecond. Each partition stays in offset order. A command is
therefore decided before the provider events that answer it (parking is rare, not the rule), and
cross-topic races that depend on order (a retry after the completion of the turn it replaces, a
request after a settlement that freed quota) replay the way they happened live.

A micro-batch holds records of one topic. To keep batches large without changing the outcome,
a record may move ahead of earlier records of other topics when it cannot interact with them: it
belongs to another tenant *and* another chat (every row the processors touch is keyed by chat,
or by tenant and user for quota rows). A record whose tenant or chat cannot be read (it will be
dead-lettered) moves nothing past it. So a multi-tenant log replays in full batches, and a
single-tenant log replays in the merged order, batch boundaries falling where the topic changes.

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

import asyncio
import dataclasses
import heapq
import json
import logging
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TextIO, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from minichat.domain.commands import command_id_of
from minichat.domain.turns import TurnEvent
from minichat.models.events import TurnRequestEvent
from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_processors
from minichat.processors.pipeline import BatchProcessor, Decoded, Handler, Producer
from minichat.processors.records import Output, SourceRecord, timestamp_from_ms
from minichat.settings import Settings
from minichat.storage.db import columns, create_pool
from minichat.storage.digest import row_expression, table_spec
from minichat.storage.policies import ensure_policy_version
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


class DiscardingProducer:
    """The processors' producer during a replay: counts records by topic, sends nothing."""

    def __init__(self) -> None:
        self.discarded: dict[str, int] = {}

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]:
        self.discarded[topic] = self.discarded.get(topic, 0) + 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _record_id(record: SourceRecord) -> RecordId:
    return (record.topic, record.partition, record.offset)


_DECISIONS_PRESENT = """
SELECT d.chat_id, d.command_id
FROM turn_decisions d
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, command_id)
  ON d.tenant_id = k.tenant_id AND d.chat_id = k.chat_id AND d.command_id = k.command_id
"""


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
        before = await self._present(con, unique)
        outputs = await self.inner(con, batch)
        after = await self._present(con, unique)
        outcomes: dict[RecordId, str] = {}
        counted: set[tuple[uuid.UUID, uuid.UUID]] = set()
        for item, (_, chat_id, command_id) in zip(batch, keys, strict=True):
            key = (chat_id, command_id)
            new = key in after and key not in before and key not in counted
            counted.add(key)
            outcomes[_record_id(item.record)] = APPLIED if new else UNCHANGED
        self.outcomes = outcomes  # only the attempt whose transaction committed is read
        return outputs

    @staticmethod
    async def _present(
        con: asyncpg.Connection, keys: Sequence[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]
    ) -> set[tuple[uuid.UUID, uuid.UUID]]:
        if not keys:
            return set()
        rows = await con.fetch(_DECISIONS_PRESENT, *columns(keys, 3))
        return {(r["chat_id"], r["command_id"]) for r in rows}


_PARKED_OF_BATCH = """
SELECT p.source_topic, p.source_partition, p.source_offset
FROM parked_events p
JOIN unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[]) AS k (tenant_id, topic, part, off)
  ON p.tenant_id = k.tenant_id AND p.source_topic = k.topic
 AND p.source_partition = k.part AND p.source_offset = k.off
"""


@dataclass
class TurnEventOutcomes:
    """Wraps a provider/usage handler: an event is applied when its turn's row changed in the batch
    (the row as the digest covers it), parked when it sits in `parked_events` after the batch."""

    inner: Handler[TurnEvent]
    turn_row_sql: str
    outcomes: dict[RecordId, str] = field(default_factory=dict)

    async def __call__(self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnEvent]]) -> list[Output]:
        turns = sorted({(d.event.tenant_id, d.event.chat_id, d.event.request_id) for d in batch})
        before = await self._fingerprints(con, turns)
        outputs = await self.inner(con, batch)
        after = await self._fingerprints(con, turns)
        parked = await self._parked(con, batch)
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
        self.outcomes = outcomes
        return outputs

    async def _fingerprints(
        self, con: asyncpg.Connection, turns: Sequence[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]
    ) -> dict[tuple[uuid.UUID, uuid.UUID, uuid.UUID], str]:
        if not turns:
            return {}
        rows = await con.fetch(self.turn_row_sql, *columns(turns, 3))
        return {(r["tenant_id"], r["chat_id"], r["request_id"]): r["fingerprint"] for r in rows}

    @staticmethod
    async def _parked(con: asyncpg.Connection, batch: Sequence[Decoded[TurnEvent]]) -> set[RecordId]:
        keys = [(d.event.tenant_id, d.record.topic, d.record.partition, d.record.offset) for d in batch]
        rows = await con.fetch(_PARKED_OF_BATCH, *columns(keys, 4))
        return {(r["source_topic"], r["source_partition"], r["source_offset"]) for r in rows}


async def turn_fingerprint_sql(con: asyncpg.Connection) -> str:
    """md5 of each `chat_turns` row over the digest's covered columns, for a set of turn keys."""
    spec = await table_spec(con, "chat_turns")
    return f"""
SELECT t.tenant_id, t.chat_id, t.request_id, md5({row_expression(spec.columns, "t")}) AS fingerprint
FROM chat_turns t
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, request_id)
  ON t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
"""


# --------------------------------------------------------------------------------------- merging


@dataclass(frozen=True, slots=True)
class Item:
    """A record of the merged stream with what it may touch: (tenant, chat), or None when unknown."""

    record: SourceRecord
    scope: tuple[uuid.UUID, uuid.UUID] | None


def scope_of(key: bytes | None, value: bytes) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The tenant and chat a record can touch; None when either cannot be read (it will be
    dead-lettered, and is then treated as touching everything: nothing moves past it)."""
    try:
        chat = uuid.UUID((key or b"").decode())
        body = json.loads(value)
        tenant = uuid.UUID(str(body["tenant_id"]))
        if uuid.UUID(str(body["chat_id"])) != chat:
            return None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError):
        return None
    return (tenant, chat)


def next_batch(pending: Sequence[Item], batch_max: int) -> tuple[list[Item], list[Item]]:
    """The next micro-batch: the first pending record's topic, plus later records of that topic
    that can move ahead of every record they pass (another tenant and another chat). Returns the
    batch and what stays pending, both in merged order."""
    if not pending:
        return [], []
    topic = pending[0].record.topic
    batch: list[Item] = []
    rest: list[Item] = []
    blocked_tenants: set[uuid.UUID] = set()
    blocked_chats: set[uuid.UUID] = set()
    barrier = False
    for index, item in enumerate(pending):
        if barrier or len(batch) >= batch_max:
            rest.extend(pending[index:])
            break
        scope = item.scope
        if scope is None:
            free = not blocked_tenants and not blocked_chats and not rest
        else:
            free = scope[0] not in blocked_tenants and scope[1] not in blocked_chats
        if item.record.topic == topic and free:
            batch.append(item)
            continue
        rest.append(item)
        if scope is None:
            barrier = True
        else:
            blocked_tenants.add(scope[0])
            blocked_chats.add(scope[1])
    return batch, rest


@dataclass
class _Partition:
    tp: TopicPartition
    rank: int
    end: int
    buffer: deque[Any] = field(default_factory=deque)
    exhausted: bool = False  # everything below `end` has been fetched

    def head_key(self) -> tuple[int, int, int, int]:
        record = self.buffer[0]
        return (record.timestamp, self.rank, record.partition, record.offset)


class MergedLog:
    """The input partitions' records in (timestamp, topic rank, partition, offset) order, each
    partition in offset order, each stopping at its end offset."""

    def __init__(
        self, consumer: Any, ranges: Mapping[TopicPartition, tuple[int, int]], ranks: Mapping[str, int]
    ):
        self.consumer = consumer
        self.partitions = [
            _Partition(tp, ranks[tp.topic], end, exhausted=start >= end)
            for tp, (start, end) in sorted(
                ranges.items(), key=lambda kv: (ranks[kv[0].topic], kv[0].partition)
            )
        ]
        self._heap: list[tuple[tuple[int, int, int, int], int]] = []
        self._needy = {i for i, p in enumerate(self.partitions) if not p.exhausted}

    async def next(self) -> Any | None:
        if self._needy:
            await self._fill()
        if not self._heap:
            return None
        _, index = heapq.heappop(self._heap)
        part = self.partitions[index]
        record = part.buffer.popleft()
        if part.buffer:
            heapq.heappush(self._heap, (part.head_key(), index))
        elif not part.exhausted:
            self._needy.add(index)
        return record

    async def _fill(self) -> None:
        """Fetch until every partition that is not exhausted has a record buffered. (aiokafka
        prefetches at most one fetch response per partition, so memory stays bounded.)"""
        while self._needy:
            wanted = [self.partitions[i].tp for i in sorted(self._needy)]
            fetched = await self.consumer.getmany(*wanted, timeout_ms=500, max_records=1000)
            for index in sorted(self._needy):
                part = self.partitions[index]
                for record in fetched.get(part.tp, ()):
                    if record.offset >= part.end:
                        part.exhausted = True
                        break
                    part.buffer.append(record)
                    if record.offset + 1 >= part.end:
                        part.exhausted = True
                        break
                if not part.buffer and not part.exhausted and part.tp not in fetched:
                    # Nothing came: offsets below the end may hold no record (transaction markers).
                    part.exhausted = await self.consumer.position(part.tp) >= part.end
                if part.exhausted:
                    self.consumer.pause(part.tp)
                if part.buffer:
                    heapq.heappush(self._heap, (part.head_key(), index))
                    self._needy.discard(index)
                elif part.exhausted:
                    self._needy.discard(index)


def source_record(record: Any) -> SourceRecord:
    value = record.value
    return SourceRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=value if isinstance(value, bytes) else bytes(value or b""),
        timestamp=timestamp_from_ms(record.timestamp),
    )


# ----------------------------------------------------------------------------------------- replay


def parse_time(text: str) -> datetime:
    """RFC 3339 with an offset (`2025-01-31T12:00:00Z`); a time without an offset is refused."""
    value = datetime.fromisoformat(text.strip().upper())
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: write it as RFC 3339, e.g. 2025-01-31T12:00:00Z")
    return value


@dataclass
class _Wired(Generic[E]):
    processor: BatchProcessor[E]
    outcomes: CommandOutcomes | TurnEventOutcomes


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


async def _parked_count(pool: asyncpg.Pool) -> int:
    # Operator command, all tenants: how many events wait for their command.
    count: int = await pool.fetchval("SELECT count(*) FROM parked_events")
    return count


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
    ranks = {topic: rank for rank, topic in enumerate(topics)}
    policy = load_policy(settings.policy_file)
    summary = ReplaySummary(read_by_topic=dict.fromkeys(topics, 0))
    started = time.monotonic()

    pool = await create_pool(settings, min_size=1, max_size=2)
    try:
        async with pool.acquire() as con:
            pending = await pending_migrations(con)
            if pending:
                raise ReplaySetupError(
                    f"the database schema is missing or old ({len(pending)} migration(s) pending): "
                    "run `minichat db migrate`"
                )
            if await ensure_policy_version(con, policy):
                logger.info("stored policy version %d", policy.version)
            fingerprint_sql = await turn_fingerprint_sql(con)
        summary.parked_at_start = await _parked_count(pool)

        producer = DiscardingProducer()

        async def get_pool() -> asyncpg.Pool:
            return pool

        async def get_producer() -> Producer:
            return producer

        wired: dict[str, _Wired[Any]] = {}
        for topic, processor in build_processors(settings, policy, get_pool, get_producer).items():
            outcomes: CommandOutcomes | TurnEventOutcomes
            if topic == names.turn_requests:
                outcomes = CommandOutcomes(processor.handle)
            else:
                outcomes = TurnEventOutcomes(processor.handle, fingerprint_sql)
            wired[topic] = _Wired(dataclasses.replace(processor, handle=outcomes), outcomes)

        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap_servers, client_id="minichat-replay-admin"
        )
        await admin.start()
        try:
            partitions = await _topic_partitions(admin, topics)
            consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                group_id=None,  # no group: nothing is ever committed, the workers' group is untouched
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                client_id="minichat-replay",
            )
            await consumer.start()
            try:
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
                assigned = [tp for tp, (start, end) in ranges.items() if start < end]
                consumer.assign(assigned)
                for tp in assigned:
                    consumer.seek(tp, ranges[tp][0])
                bar = Progress(total, progress) if show_progress else None
                log = MergedLog(consumer, {tp: ranges[tp] for tp in assigned}, ranks)
                await _replay_loop(log, wired, names, settings.batch_max, summary, bar)
                if bar is not None:
                    bar.finish()
            finally:
                await consumer.stop()
        finally:
            await admin.close()
        summary.parked_at_end = await _parked_count(pool)
        summary.decisions_discarded = producer.discarded.get(names.turn_decisions, 0)
    finally:
        await pool.close()
    summary.elapsed_s = time.monotonic() - started
    return summary


async def _replay_loop(
    log: MergedLog,
    wired: Mapping[str, _Wired[Any]],
    names: TopicNames,
    batch_max: int,
    summary: ReplaySummary,
    bar: Progress | None,
) -> None:
    lookahead = batch_max * 2
    pending: list[Item] = []
    exhausted = False
    while True:
        while not exhausted and len(pending) < lookahead:
            raw = await log.next()
            if raw is None:
                exhausted = True
                break
            record = source_record(raw)
            pending.append(Item(record, scope_of(record.key, record.value)))
        if not pending:
            return
        batch, pending = next_batch(pending, batch_max)
        await _process(wired[batch[0].record.topic], [i.record for i in batch], names, summary)
        if bar is not None:
            bar.advance(len(batch))


async def _process(
    target: _Wired[Any], records: list[SourceRecord], names: TopicNames, summary: ReplaySummary
) -> None:
    target.outcomes.outcomes = {}
    produced = await target.processor.process(records)
    dead: set[RecordId] = set()
    for out in produced:
        if out.topic == names.dead_letters:
            letter = json.loads(out.value)
            dead.add((letter["source_topic"], letter["partition"], letter["offset"]))
    outcomes = target.outcomes.outcomes
    summary.batches += 1
    for record in records:
        rid = _record_id(record)
        summary.read += 1
        summary.read_by_topic[record.topic] = summary.read_by_topic.get(record.topic, 0) + 1
        outcome = outcomes.get(rid, UNCHANGED)
        if rid in dead:
            summary.dead_lettered += 1
        elif outcome == APPLIED:
            summary.applied += 1
        elif outcome == PARKED:
            summary.parked += 1
        else:
            summary.already_applied += 1
