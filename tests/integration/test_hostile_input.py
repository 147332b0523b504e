"""Hostile and broken records between valid traffic, through a live worker (docs/contract.md,
"Dead-letter codes", "Admission", "Guarantees").

The corpus (`tests/data/hostile_records.py`) says what each record must produce. Here every record
is produced between valid turns of the same partition of the same topic, and the test checks:

* each record's outcome: one dead letter with the right code, detail, key and payload, or the
  right rejection, or nothing at all;
* no dead letter and no decision that the corpus does not expect;
* the valid traffic around the records is fully processed (every command decided, every turn
  settled, from its own completion and never from a hostile one);
* another tenant's rows are byte-for-byte what they were, and nothing is stored under its keys;
* message content (the corpus' `MARKER`) is in no `error_detail` and nowhere in the worker's log.

The decoder's verdict on each record is also checked offline, without a broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from minichat.models.events import DEAD_LETTER_CODES, DecodeError, decode
from minichat.models.topics import TopicNames
from minichat.settings import Settings
from minichat.tools.kafka import InputLag, topic_partitions
from tests.conftest import Live, live_deployment
from tests.data.hostile_records import (
    CORPUS,
    FIELD_WIDTHS,
    MARKER,
    DeadLettered,
    Hostile,
    Ignored,
    Record,
    Rejected,
    Scene,
    dead_letter_payload,
)
from tests.gateway import Event
from tests.support import DeadlineExceeded, Endpoints, TopicReader, wait_until

TENANT_TABLES = (
    "chats",
    "chat_turns",
    "messages",
    "quota_usage",
    "turn_decisions",
    "outbox",
    "parked_events",
)
VALID_USAGE = {"input_tokens": 10, "output_tokens": 20}
VALID_ANSWER = "a valid answer"


def scene() -> Scene:
    """A scene of random ids (the offline checks need no real tenants)."""
    return Scene(*(uuid.uuid4() for _ in dataclasses.fields(Scene)))


# ------------------------------------------------------------------------------ the corpus, offline


def test_the_corpus_covers_every_dead_letter_code_and_topic() -> None:
    names = [h.name for h in CORPUS + FIELD_WIDTHS]
    assert len(names) == len(set(names)), "record names are unique"
    codes = {h.outcome.code for h in CORPUS if isinstance(h.outcome, DeadLettered)}
    # Not a record's bytes alone: `timestamp_type` needs a topic that lets producers set the time
    # (test_timestamps.py), `unprocessable` a database that refuses the record (test_refused_records.py),
    # `wrong_partition` a producer that picks the partition (test_wrong_partition.py).
    assert codes == set(DEAD_LETTER_CODES) - {"timestamp_type", "unprocessable", "wrong_partition"}
    assert {h.topic for h in CORPUS} == {"turn-requests", "provider-responses", "usage"}
    assert any(isinstance(h.outcome, Rejected) for h in CORPUS)
    assert any(isinstance(h.outcome, Ignored) for h in CORPUS)


def _decoder_verdict(hostile: Hostile) -> None:
    record = hostile.build(scene())
    outcome = hostile.outcome
    decodes = not isinstance(outcome, DeadLettered) or outcome.code == "tenant_mismatch"
    if decodes:
        decode(hostile.topic, record.key, record.value)  # the processor decides after decoding
        return
    assert isinstance(outcome, DeadLettered)
    with pytest.raises(DecodeError) as caught:
        decode(hostile.topic, record.key, record.value)
    assert caught.value.code == outcome.code, caught.value.detail
    if outcome.detail is not None:
        assert outcome.detail in caught.value.detail
    assert MARKER not in caught.value.detail


@pytest.mark.parametrize("hostile", CORPUS, ids=[h.name for h in CORPUS])
def test_decoder_verdict(hostile: Hostile) -> None:
    _decoder_verdict(hostile)


@pytest.mark.parametrize("hostile", FIELD_WIDTHS, ids=[h.name for h in FIELD_WIDTHS])
def test_values_wider_than_their_column_are_refused_by_the_decoder(hostile: Hostile) -> None:
    """A value the database cannot store must be dead-lettered at the edge: accepted, it fails the
    batch's transaction, the worker stops, and the partition is stuck on that record for good."""
    _decoder_verdict(hostile)


# ------------------------------------------------------------------------------ live helpers


@dataclass
class Wire:
    """Produces single records in order, each acknowledged before the next; gzip on request."""

    bootstrap: str
    partitions: int
    plain: AIOKafkaProducer | None = None
    gzip: AIOKafkaProducer | None = None
    partitioner: DefaultPartitioner = field(default_factory=DefaultPartitioner)

    async def __aenter__(self) -> Wire:
        # The broker takes at most `max.message.bytes` (default 1048588) per batch, compressed size:
        # a value above MAX_PAYLOAD_BYTES reaches a topic only compressed, which is how it is sent.
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "acks": "all", "linger_ms": 0}
        self.plain = AIOKafkaProducer(**options, max_request_size=4 * 1024 * 1024)
        self.gzip = AIOKafkaProducer(**options, max_request_size=4 * 1024 * 1024, compression_type="gzip")
        await self.plain.start()
        await self.gzip.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for producer in (self.plain, self.gzip):
            if producer is not None:
                await producer.stop()

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, *, compress: bool = False
    ) -> Any:
        producer = self.gzip if compress else self.plain
        assert producer is not None
        return await (await producer.send(topic, value=value, key=key))

    async def event(self, topic: str, event: Event) -> Any:
        return await self.send(topic, str(event["chat_id"]).encode(), json.dumps(event).encode())

    def partition_of(self, key: bytes) -> int:
        every = list(range(self.partitions))
        return int(self.partitioner(key, every, every))

    def chat_on(self, partition: int) -> uuid.UUID:
        """A new chat id whose records land on `partition` (Kafka's default partitioner)."""
        while True:
            chat = uuid.uuid4()
            if self.partition_of(str(chat).encode()) == partition:
                return chat


@dataclass
class Valid:
    """One valid turn of the sender: its command, then its completion (and usage report)."""

    command: Event
    split_usage: bool = False  # completion without usage, then a usage.reported

    @property
    def chat(self) -> uuid.UUID:
        return uuid.UUID(self.command["chat_id"])

    @property
    def request(self) -> uuid.UUID:
        return uuid.UUID(self.command["request_id"])


async def finish(live: Live, wire: Wire, turns: Sequence[Valid]) -> None:
    names = TopicNames(live.settings.topic_prefix)
    for turn in turns:
        usage = {} if turn.split_usage else {"usage": VALID_USAGE}
        await wire.event(
            names.provider_responses,
            live.gateway.provider("turn.completed", turn.command, content=VALID_ANSWER, **usage),
        )
    for turn in turns:
        if turn.split_usage:
            await wire.event(names.usage, live.gateway.usage(turn.command, **VALID_USAGE))


CHAT_COLUMN = {
    "chats": "id",
    "chat_turns": "chat_id",
    "messages": "chat_id",
    "turn_decisions": "chat_id",
    "parked_events": "chat_id",
}
PROCESSING_CLOCK = ("_seen_at", "_sent_at", "published_at")  # the relay and the watchdog move these


def _plain(row: asyncpg.Record) -> dict[str, Any]:
    return {k: v for k, v in dict(row).items() if not k.endswith(PROCESSING_CLOCK)}


async def tenant_rows(db: asyncpg.Pool, tenant: uuid.UUID) -> dict[str, list[dict[str, Any]]]:
    """Every row of one tenant, every table, stable order, processing-clock columns aside."""
    result: dict[str, list[dict[str, Any]]] = {}
    for table in TENANT_TABLES:
        rows = await db.fetch(f"SELECT * FROM {table} WHERE tenant_id = $1", tenant)
        result[table] = sorted((_plain(r) for r in rows), key=repr)
    return result


async def chat_rows(
    db: asyncpg.Pool, chats: Sequence[uuid.UUID], *, tenant: uuid.UUID, same: bool
) -> dict[str, list[dict[str, Any]]]:
    """Rows of these chats in the tables keyed by chat, of `tenant` (same) or of everyone else."""
    op = "=" if same else "<>"
    result: dict[str, list[dict[str, Any]]] = {}
    for table, column in CHAT_COLUMN.items():
        rows = await db.fetch(
            f"SELECT * FROM {table} WHERE tenant_id {op} $1 AND {column} = ANY($2::uuid[])",
            tenant,
            list(chats),
        )
        result[table] = sorted((_plain(r) for r in rows), key=repr)
    return result


async def settled_count(db: asyncpg.Pool, tenant: uuid.UUID) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND settled_at IS NOT NULL", tenant
        )
    )


@pytest.fixture(scope="module")
async def hostile_live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    async with live_deployment(endpoints, template_database, tmp_path_factory.mktemp("hostile")) as live:
        yield live


@pytest.fixture(scope="module")
async def dead_letters(hostile_live: Live) -> AsyncIterator[TopicReader]:
    topic = TopicNames(hostile_live.settings.topic_prefix).dead_letters
    async with TopicReader(hostile_live.settings.kafka_bootstrap_servers, topic) as reader:
        yield reader


# ------------------------------------------------------------------------------ the live corpus


@pytest.mark.integration
async def test_hostile_corpus_between_valid_traffic(hostile_live: Live, dead_letters: TopicReader) -> None:
    live, gw = hostile_live, hostile_live.gateway
    names = TopicNames(live.settings.topic_prefix)
    topic_of = {"turn-requests": names.turn_requests, "provider-responses": names.provider_responses}
    topic_of["usage"] = names.usage
    sender, user = uuid.uuid4(), uuid.uuid4()
    victim, victim_user = uuid.uuid4(), uuid.uuid4()

    async with Wire(live.settings.kafka_bootstrap_servers, live.settings.partitions) as wire:
        # -- the stage: the victim's settled and running turns, the sender's deleted chat, and one
        #    valid turn per partition before any hostile record
        v_settled = gw.requested(victim, victim_user, uuid.uuid4(), content="the victim's own words")
        v_running = gw.requested(victim, victim_user, uuid.uuid4(), content="the victim's running turn")
        doomed = gw.requested(sender, user, uuid.uuid4())
        warmup = [Valid(gw.requested(sender, user, wire.chat_on(p))) for p in range(live.settings.partitions)]
        stage = [v_settled, v_running, doomed, *(w.command for w in warmup)]
        assert {d["decision"] for d in await gw.decide(*stage)} == {"allow"}
        await finish(live, wire, [Valid(v_settled), Valid(doomed), *warmup])

        async def stage_settled() -> bool:
            return await settled_count(live.db, victim) == 1 and await settled_count(
                live.db, sender
            ) == 1 + len(warmup)

        await wait_until(stage_settled, timeout=60, what="the stage's turns to settle")
        [deleted] = await gw.decide(gw.delete_chat(sender, user, uuid.UUID(doomed["chat_id"])))
        assert deleted["decision"] == "done"

        victim_before = await tenant_rows(live.db, victim)
        doomed_chat = uuid.UUID(doomed["chat_id"])
        doomed_before = await chat_rows(live.db, [doomed_chat], tenant=sender, same=True)

        # -- the corpus: a subject turn before each record, a follower on its partition after it
        placed: list[tuple[Hostile, Record, Any]] = []
        subjects: list[Valid] = []
        followers: list[Valid] = []
        for hostile in CORPUS:
            split = hostile.topic == "usage"
            subject = Valid(gw.requested(sender, user, uuid.uuid4(), content="subject"), split)
            await wire.event(names.turn_requests, subject.command)
            record = hostile.build(
                Scene(
                    tenant=sender,
                    user=user,
                    chat=subject.chat,
                    request=subject.request,
                    victim_tenant=victim,
                    victim_user=victim_user,
                    victim_chat=uuid.UUID(v_settled["chat_id"]),
                    victim_request=uuid.UUID(v_settled["request_id"]),
                    victim_running_chat=uuid.UUID(v_running["chat_id"]),
                    victim_running_request=uuid.UUID(v_running["request_id"]),
                    deleted_chat=doomed_chat,
                    deleted_request=uuid.UUID(doomed["request_id"]),
                    fresh_chat=uuid.uuid4(),
                )
            )
            meta = await wire.send(
                topic_of[hostile.topic], record.key, record.value, compress=hostile.compress
            )
            placed.append((hostile, record, meta))
            follower = Valid(
                gw.requested(sender, user, wire.chat_on(meta.partition), content="follower"), split
            )
            await wire.event(names.turn_requests, follower.command)
            await finish(live, wire, [subject, follower])
            subjects.append(subject)
            followers.append(follower)

    # -- everything valid is decided and settled
    valid = [*warmup, *subjects, *followers]
    rejected = [(h, json.loads(r.value or b"")) for h, r, _ in placed if isinstance(h.outcome, Rejected)]
    decisions = await gw.answers([v.command for v in valid] + [e for _, e in rejected], timeout=120)
    by_event = {d["command_event_id"]: d for d in decisions}
    for turn in valid:
        assert by_event[turn.command["event_id"]]["decision"] == "allow", by_event[turn.command["event_id"]]

    async def all_settled() -> bool:
        return await settled_count(live.db, sender) == 1 + len(valid)

    await wait_until(all_settled, timeout=120, what="every valid turn to settle")

    # -- each record's outcome
    expected_letters = {
        (meta.topic, meta.partition, meta.offset): (hostile, record)
        for hostile, record, meta in placed
        if isinstance(hostile.outcome, DeadLettered)
    }
    with contextlib.suppress(DeadlineExceeded):  # a missing one is reported by name below
        await dead_letters.wait_for(
            lambda v: len(v) >= len(expected_letters), timeout=30, what="dead letters"
        )
    # Anything unexpected is on the topic too once the worker has committed every input record
    # (a batch's dead letters are acked before its offsets move): read the topic to that end.
    async with InputLag(live.settings) as lag:

        async def committed() -> bool:
            return await lag.measure() == 0

        await wait_until(committed, timeout=60, what="the worker to commit every input record")
    letters_topic = TopicNames(live.settings.topic_prefix).dead_letters
    on_topic = await records_on(live.settings, letters_topic)
    await dead_letters.wait_for(lambda v: len(v) >= on_topic, timeout=30, what="every dead letter")
    letters = {}
    for message in dead_letters.records:
        letter = json.loads(message.value)
        place = (letter["source_topic"], letter["partition"], letter["offset"])
        assert place not in letters, f"two dead letters for {place}"
        letters[place] = (message.key, letter)
        assert MARKER not in letter["error_detail"], letter["error_detail"]
    unexpected = {
        place: (letter["error_code"], letter["error_detail"])
        for place, (_, letter) in letters.items()
        if place not in expected_letters
    }
    assert unexpected == {}, "dead letters the corpus does not expect"

    failures: list[str] = []
    for hostile, record, meta in placed:
        place = (meta.topic, meta.partition, meta.offset)
        outcome = hostile.outcome
        if isinstance(outcome, DeadLettered):
            if place not in letters:
                failures.append(f"{hostile.name}: no dead letter")
                continue
            key, letter = letters[place]
            payload, encoding, truncated = dead_letter_payload(record.value)
            got = (letter["error_code"], key, letter["payload"], letter["payload_encoding"])
            if (
                got != (outcome.code, record.key, payload, encoding)
                or letter["payload_truncated"] != truncated
            ):
                failures.append(
                    f"{hostile.name}: {letter['error_code']} {letter['error_detail']!r} key={key!r}"
                )
            elif outcome.detail is not None and outcome.detail not in letter["error_detail"]:
                failures.append(f"{hostile.name}: detail {letter['error_detail']!r} lacks {outcome.detail!r}")
        elif isinstance(outcome, Rejected):
            event = json.loads(record.value or b"")
            decision = by_event[event["event_id"]]
            if (decision["decision"], decision["error_code"], decision["replay"]) != (
                "reject",
                outcome.code,
                False,
            ):
                failures.append(f"{hostile.name}: {decision}")
            if decision["tenant_id"] != str(sender) or decision["turn_id"] is not None:
                failures.append(f"{hostile.name}: the answer names another tenant or a turn: {decision}")
        elif place in letters:
            failures.append(f"{hostile.name}: dead-lettered, but it is valid and changes nothing")
    assert not failures, "\n".join(failures)

    # -- the valid turns settled from their own completions, never from a hostile record
    turns = await live.db.fetch(
        """
        SELECT t.chat_id, t.state, t.settlement_method, t.input_tokens, t.output_tokens,
               t.reserved_credits_micro, m.content
        FROM chat_turns t
        LEFT JOIN messages m ON m.tenant_id = t.tenant_id AND m.id = t.assistant_message_id
        WHERE t.tenant_id = $1 AND t.chat_id = ANY($2::uuid[])
        """,
        sender,
        [v.chat for v in valid],
    )
    assert len(turns) == len(valid)
    for turn in turns:
        got = (turn["state"], turn["settlement_method"], turn["input_tokens"], turn["output_tokens"])
        assert got == ("completed", "actual", 10, 20), dict(turn)
        assert turn["content"] == VALID_ANSWER, dict(turn)

    # -- nothing of anyone else changed, nothing is stored under their keys
    assert await tenant_rows(live.db, victim) == victim_before
    victim_chats = [uuid.UUID(v_settled["chat_id"]), uuid.UUID(v_running["chat_id"])]
    squatters = await chat_rows(live.db, victim_chats, tenant=victim, same=False)
    assert squatters == {t: [] for t in CHAT_COLUMN}, "rows of another tenant under the victim's chats"
    # the sender's deleted chat: still deleted, its turn and messages untouched (decisions may grow)
    doomed_after = await chat_rows(live.db, [doomed_chat], tenant=sender, same=True)
    for table in ("chats", "chat_turns", "messages", "parked_events"):
        assert doomed_after[table] == doomed_before[table], table

    # -- no rows of any other tenant, no chat or turn from a hostile record, no reserve left over
    for table in TENANT_TABLES:
        tenants = {r[0] for r in await live.db.fetch(f"SELECT DISTINCT tenant_id FROM {table}")}
        assert tenants <= {sender, victim}, table
    chats = {r[0] for r in await live.db.fetch("SELECT id FROM chats WHERE tenant_id = $1", sender)}
    assert chats == {v.chat for v in valid} | {doomed_chat}
    reserved = await live.db.fetchval(
        "SELECT sum(reserved_credits_micro) FROM quota_usage WHERE tenant_id = $1", sender
    )
    assert reserved == 0
    assert await live.db.fetchval("SELECT count(*) FROM parked_events") == 0

    log = live.logs()
    assert MARKER not in "\n".join(w.log() for w in live.workers), "message content in the worker log"
    assert "dead-letter" in log


@pytest.mark.integration
async def test_a_tenant_cannot_take_another_tenants_command_key(hostile_live: Live) -> None:
    """A rejected command of tenant A naming B's chat must store nothing under (chat, request):
    B's own command with that request id is then decided normally, and its duplicate replayed."""
    gw = hostile_live.gateway
    a, a_user, b, b_user = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    chat, future = uuid.uuid4(), uuid.uuid4()
    first = gw.requested(b, b_user, chat)
    [opened] = await gw.decide(first)
    assert opened["decision"] == "allow"
    await gw.send_provider(gw.provider("turn.completed", first, content="x", usage=VALID_USAGE))

    async def settled() -> bool:
        return await settled_count(hostile_live.db, b) == 1

    await wait_until(settled, timeout=30, what="B's first turn to settle")

    squat = gw.requested(a, a_user, chat, request_id=future)
    [refused] = await gw.decide(squat)
    assert (refused["decision"], refused["error_code"]) == ("reject", "chat_not_found")
    assert await hostile_live.db.fetchval("SELECT count(*) FROM turn_decisions WHERE tenant_id = $1", a) == 0

    own = gw.requested(b, b_user, chat, request_id=future)
    [decided] = await gw.decide(own)
    assert decided["decision"] == "allow", decided
    await gw.send(own)
    answers = await gw.answers([own], copies=2)
    assert [x["replay"] for x in answers] == [False, True]
    assert {**answers[1], "replay": False} == answers[0]
    stored = await hostile_live.db.fetch(
        "SELECT tenant_id FROM turn_decisions WHERE chat_id = $1 AND command_id = $2", chat, future
    )
    assert [r["tenant_id"] for r in stored] == [b]


@pytest.mark.integration
@pytest.mark.parametrize("hostile", FIELD_WIDTHS, ids=[h.name for h in FIELD_WIDTHS])
async def test_values_wider_than_their_column_do_not_stop_the_partition(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory, hostile: Hostile
) -> None:
    """The record names a real running turn (or a new chat); after it, a valid turn on the same
    partition must still be decided and the worker must still be running. One deployment each: a
    record that stops the worker would hide the next one."""
    async with live_deployment(endpoints, template_database, tmp_path_factory.mktemp("widths")) as live:
        gw, names = live.gateway, TopicNames(live.settings.topic_prefix)
        topic_of = {"turn-requests": names.turn_requests, "provider-responses": names.provider_responses}
        topic_of["usage"] = names.usage
        sender, user = uuid.uuid4(), uuid.uuid4()
        async with Wire(live.settings.kafka_bootstrap_servers, live.settings.partitions) as wire:
            subject = gw.requested(sender, user, uuid.uuid4())
            [answer] = await gw.decide(subject)
            assert answer["decision"] == "allow"
            own = {"chat": uuid.UUID(subject["chat_id"]), "request": uuid.UUID(subject["request_id"])}
            record = hostile.build(dataclasses.replace(scene(), tenant=sender, user=user, **own))
            meta = await wire.send(topic_of[hostile.topic], record.key, record.value)
            follower = gw.requested(sender, user, wire.chat_on(meta.partition))
            await wire.event(names.turn_requests, follower)

            async def answered_or_stopped() -> str | None:
                if any(w.proc.poll() is not None for w in live.workers):
                    return "stopped"
                await gw.decisions.poll()
                seen = {v["command_event_id"] for v in gw.decisions.values()}
                return "answered" if follower["event_id"] in seen else None

            result = await wait_until(answered_or_stopped, timeout=30, what="the follower or a crash")
            exited = [w.proc.poll() for w in live.workers if w.proc.poll() is not None]
            errors = [line for line in live.logs().splitlines() if "Error:" in line][-2:]
            assert result == "answered", f"{hostile.name} stopped the worker (exit {exited}): {errors}"


async def records_on(settings: Settings, topic: str) -> int:
    """How many records a topic holds (its end offsets; nothing is ever deleted here)."""
    from aiokafka import AIOKafkaConsumer

    partitions = (await topic_partitions(settings, [topic]))[topic]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()
