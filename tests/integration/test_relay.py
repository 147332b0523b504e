"""The outbox relay against the real broker and database: order, keys, exact bytes, one relay at a time,
and repeats (never losses) when the mark step did not happen."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from minichat.domain.ids import turn_id_for
from minichat.models.events import OUTPUT_ADAPTER, UsageAdjusted, UsageSettled, dedupe_key
from minichat.models.topics import TopicNames
from minichat.processors.errors import RetryPolicy
from minichat.processors.leadership import RELAY_LOCK, ExclusiveSession
from minichat.processors.pipeline import Producer
from minichat.processors.relay import OutboxRelay, one_per_turn
from minichat.storage.db import create_pool
from minichat.storage.outbox import OutboxRow, insert_outbox, outbox_entry
from tests.conftest import Deployment
from tests.support import TopicReader, wait_until

pytestmark = pytest.mark.integration

SETTLED_AT = datetime(2026, 3, 14, 9, 26, 53, 589_000, tzinfo=UTC)


class KafkaProducer:
    """A real aiokafka producer behind the `Producer` protocol that faust's producer satisfies."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]:
        timestamp_ms = None if timestamp is None else round(timestamp * 1000)
        fut: Awaitable[Any] = await self._producer.send(
            topic, value=value, key=key, partition=partition, timestamp_ms=timestamp_ms, headers=headers
        )
        return fut


class GatedProducer:
    """Holds every send until `gate` opens, so a relay can be caught in the middle of a run."""

    def __init__(self, inner: Producer) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]:
        self.entered.set()
        await self.gate.wait()
        return await self.inner.send(topic, key, value, partition, timestamp, headers)


async def read_to_end(deployment: Deployment, topic: str, *, timeout: float = 30.0) -> list[Any]:
    """Every record of `topic` up to its end offsets taken now, by (partition, offset).

    The relay returns only after every ack, so what it published is below the end offsets.
    """
    settings = deployment.settings
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        records: list[Any] = []

        async def caught_up() -> bool:
            for batch in (await consumer.getmany(*partitions, timeout_ms=100)).values():
                records.extend(batch)
            return all([await consumer.position(tp) >= end[tp] for tp in partitions])

        await wait_until(caught_up, timeout=timeout, what=f"the end of {topic}")
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


def dedupe_keys(records: list[Any]) -> list[str]:
    keys = []
    for record in records:
        event = OUTPUT_ADAPTER.validate_json(record.value)
        assert isinstance(event, UsageSettled | UsageAdjusted)
        keys.append(event.dedupe_key)
    return keys


def by_key(records: list[Any]) -> dict[bytes, list[bytes]]:
    grouped: dict[bytes, list[bytes]] = {}
    for record in records:
        grouped.setdefault(record.key, []).append(record.value)
    return grouped


def settled(tenant: uuid.UUID, charge: int = 1_000) -> UsageSettled:
    chat, request = uuid.uuid4(), uuid.uuid4()
    turn = turn_id_for(chat, request)
    return UsageSettled(
        dedupe_key=dedupe_key(tenant, turn, request),
        tenant_id=tenant,
        user_id=uuid.uuid4(),
        chat_id=chat,
        turn_id=turn,
        request_id=request,
        selected_model="gpt-5-mini",
        effective_model="gpt-5-mini",
        terminal_state="completed",
        billing_outcome="completed",
        settlement_method="estimated",
        reserve_tokens=16_497,
        reserved_credits_micro=32_797,
        committed_credits_micro=charge,
        policy_version_applied=1,
        period_daily=date(2026, 3, 14),
        period_monthly=date(2026, 3, 1),
        settled_at=SETTLED_AT,
    )


def adjusted(event: UsageSettled, charge: int) -> UsageAdjusted:
    fields = event.model_dump(exclude={"type", "dedupe_key", "settled_at", "settlement_method"})
    return UsageAdjusted(
        **fields,
        dedupe_key=dedupe_key(event.tenant_id, event.turn_id, event.request_id, adjusted=True),
        settlement_method="actual",
        previous_committed_credits_micro=event.committed_credits_micro,
        settled_at=event.settled_at + timedelta(seconds=30),
    )


@pytest.fixture
async def pool(deployment: Deployment) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(deployment.settings)  # with the worker's jsonb codec, as settlement has
    yield pool
    await pool.close()


@pytest.fixture
async def producer(deployment: Deployment) -> AsyncIterator[KafkaProducer]:
    producer = KafkaProducer(deployment.settings.kafka_bootstrap_servers)
    await producer.start()
    yield producer
    await producer.stop()


RelayFactory = Callable[..., OutboxRelay]


@pytest.fixture
async def make_relay(deployment: Deployment, producer: KafkaProducer) -> AsyncIterator[RelayFactory]:
    sessions: list[ExclusiveSession] = []

    def make(*, via: Producer = producer, batch_max: int = 500) -> OutboxRelay:
        session = ExclusiveSession(deployment.settings.database_url, RELAY_LOCK, f"relay-{len(sessions)}")
        sessions.append(session)

        async def get_producer() -> Producer:
            return via

        return OutboxRelay(
            session=session,
            producer=get_producer,
            topic=TopicNames(deployment.settings.topic_prefix).billing_usage,
            batch_max=batch_max,
            retry=RetryPolicy(initial_s=0.01, max_backoff_s=0.1, give_up_after_s=10),
        )

    yield make
    for session in sessions:
        await session.close()


def billing_topic(deployment: Deployment) -> str:
    return TopicNames(deployment.settings.topic_prefix).billing_usage


async def insert(pool: asyncpg.Pool, *events: UsageSettled | UsageAdjusted) -> int:
    async with pool.acquire() as con, con.transaction():
        return await insert_outbox(con, [outbox_entry(e) for e in events])


async def stored_payloads(pool: asyncpg.Pool) -> dict[str, bytes]:
    rows = await pool.fetch("SELECT dedupe_key, payload::text AS payload FROM outbox")
    return {r["dedupe_key"]: r["payload"].encode() for r in rows}


async def unpublished(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    return count


async def test_relay_publishes_in_order_keyed_by_tenant_with_the_stored_bytes(
    deployment: Deployment, pool: asyncpg.Pool, make_relay: RelayFactory
) -> None:
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    a1, b1, a2 = settled(tenant_a, 1), settled(tenant_b, 2), settled(tenant_a, 3)
    a1_adjusted = adjusted(a1, 4)
    b2, a3 = settled(tenant_b, 5), settled(tenant_a, 6)
    events: list[UsageSettled | UsageAdjusted] = [a1, b1, a2, a1_adjusted, b2, a3]
    assert await insert(pool, *events[:4]) == 4
    assert await insert(pool, *events[4:]) == 2
    assert await insert(pool, a1, a1_adjusted) == 0  # a replayed settlement adds nothing

    # batch_max 2 drives several batches, and a1's adjustment is held back from a1's batch.
    relay = make_relay(batch_max=2)
    assert await relay.run_once() == len(events)

    records = await read_to_end(deployment, billing_topic(deployment))
    assert len(records) == len(events)
    stored = await stored_payloads(pool)
    for record in records:
        event = OUTPUT_ADAPTER.validate_json(record.value)
        assert isinstance(event, UsageSettled | UsageAdjusted)
        assert record.key == str(event.tenant_id).encode()
        assert record.value == stored[event.dedupe_key]
        assert event == next(e for e in events if e.dedupe_key == event.dedupe_key)
    assert by_key(records) == {
        str(tenant).encode(): [stored[e.dedupe_key] for e in events if e.tenant_id == tenant]
        for tenant in (tenant_a, tenant_b)
    }
    assert await unpublished(pool) == 0
    published_at = await pool.fetch("SELECT published_at, created_at FROM outbox")
    assert all(r["published_at"] is not None for r in published_at)
    assert {r["created_at"] for r in published_at} == {SETTLED_AT, SETTLED_AT + timedelta(seconds=30)}

    assert await relay.run_once() == 0
    assert len(await read_to_end(deployment, billing_topic(deployment))) == len(events)


async def test_an_empty_outbox_publishes_nothing(deployment: Deployment, make_relay: RelayFactory) -> None:
    assert await make_relay().run_once() == 0
    assert await read_to_end(deployment, billing_topic(deployment)) == []


async def test_a_row_committed_after_a_later_one_is_published_by_the_next_run(
    deployment: Deployment, pool: asyncpg.Pool, make_relay: RelayFactory
) -> None:
    tenant = uuid.uuid4()
    early, late = settled(tenant, 1), settled(tenant, 2)
    relay = make_relay()
    async with pool.acquire() as slow:
        transaction = slow.transaction()
        await transaction.start()
        await insert_outbox(slow, [outbox_entry(early)])  # takes the lower id, commits last
        await insert(pool, late)

        assert await relay.run_once() == 1  # the open transaction's row is invisible, not skipped
        await transaction.commit()
    assert await relay.run_once() == 1

    records = await read_to_end(deployment, billing_topic(deployment))
    assert dedupe_keys(records) == [late.dedupe_key, early.dedupe_key]
    assert await unpublished(pool) == 0


async def test_a_second_relay_publishes_nothing_while_the_first_holds_the_lock(
    deployment: Deployment, pool: asyncpg.Pool, producer: KafkaProducer, make_relay: RelayFactory
) -> None:
    events = [settled(uuid.uuid4()) for _ in range(3)]
    await insert(pool, *events)
    gated = GatedProducer(producer)
    first, second = make_relay(via=gated), make_relay()

    running = asyncio.create_task(first.run_once())
    async with asyncio.timeout(30):
        await gated.entered.wait()
    assert await second.run_once() == 0
    assert await unpublished(pool) == len(events)
    assert await read_to_end(deployment, billing_topic(deployment)) == []

    gated.gate.set()
    assert await running == len(events)
    assert await second.run_once() == 0
    assert len(await read_to_end(deployment, billing_topic(deployment))) == len(events)


async def test_a_crash_between_produce_and_mark_repeats_events_in_order(
    deployment: Deployment, pool: asyncpg.Pool, make_relay: RelayFactory
) -> None:
    tenant = uuid.uuid4()
    first = settled(tenant, 1)
    events: list[UsageSettled | UsageAdjusted] = [
        first,
        settled(tenant, 2),
        adjusted(first, 7),
        settled(tenant, 3),
    ]
    await insert(pool, *events)
    # The mark statement fails after the records were produced and acked: a crash at that instant.
    await pool.execute(
        """
        CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'injected crash before the mark'; END $$;
        CREATE TRIGGER refuse_mark BEFORE UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_mark();
        """
    )
    with pytest.raises(asyncpg.RaiseError, match="injected crash"):
        await make_relay().run_once()
    assert await unpublished(pool) == len(events)

    await pool.execute("DROP TRIGGER refuse_mark ON outbox")
    assert await make_relay().run_once() == len(events)

    records = await read_to_end(deployment, billing_topic(deployment))
    keys = dedupe_keys(records)
    in_order = [e.dedupe_key for e in events]
    # The first run got as far as a1's settlement (its adjustment waits for the next batch).
    assert keys == [in_order[0], in_order[1], in_order[0], in_order[1], in_order[2], in_order[3]]
    assert {r.key for r in records} == {str(tenant).encode()}
    seen: list[str] = []
    for key in keys:  # billing keeps the first of each dedupe_key
        if key not in seen:
            seen.append(key)
    assert seen == in_order
    assert await unpublished(pool) == 0


async def test_the_relay_reconnects_after_losing_its_connection(
    deployment: Deployment, pool: asyncpg.Pool, make_relay: RelayFactory
) -> None:
    relay = make_relay()
    await insert(pool, settled(uuid.uuid4()))
    assert await relay.run_once() == 1
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        relay.session.name,
    )
    assert killed == 1
    await insert(pool, settled(uuid.uuid4()))
    assert await relay.run_once() == 1
    assert len(await read_to_end(deployment, billing_topic(deployment))) == 2


async def test_a_connection_lost_mid_run_repeats_the_batch_and_marks_it(
    deployment: Deployment, pool: asyncpg.Pool, producer: KafkaProducer, make_relay: RelayFactory
) -> None:
    tenant = uuid.uuid4()
    events = [settled(tenant, i) for i in range(3)]
    await insert(pool, *events)
    gated = GatedProducer(producer)
    relay = make_relay(via=gated)
    running = asyncio.create_task(relay.run_once())
    async with asyncio.timeout(30):
        await gated.entered.wait()
    # Produced but not yet marked when the database drops the relay's session (and its lock).
    assert await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        relay.session.name,
    )
    gated.gate.set()
    assert await running == len(events)

    keys = dedupe_keys(await read_to_end(deployment, billing_topic(deployment)))
    assert keys == [e.dedupe_key for e in events] * 2
    assert await unpublished(pool) == 0


async def test_a_closed_relay_does_nothing(pool: asyncpg.Pool, make_relay: RelayFactory) -> None:
    relay = make_relay()
    await insert(pool, settled(uuid.uuid4()))
    await relay.session.close()
    assert await relay.run_once() == 0
    assert await unpublished(pool) == 1


def test_one_per_turn_cuts_before_a_turns_second_event() -> None:
    tenant = uuid.uuid4()
    a, b = settled(tenant), settled(tenant)

    def row(i: int, key: str) -> OutboxRow:
        return OutboxRow(i, tenant, key, "usage.settled", b"{}", SETTLED_AT, SETTLED_AT)

    rows = [row(1, a.dedupe_key), row(2, b.dedupe_key), row(3, a.dedupe_key + "/adjusted"), row(4, "x")]
    assert [r.id for r in one_per_turn(rows)] == [1, 2]
    assert [r.id for r in one_per_turn(rows[2:])] == [3, 4]
    assert one_per_turn([]) == []


async def test_the_relay_drains_a_burst_as_a_loop_that_never_overlaps_itself(
    endpoints: Any, template_database: str, tmp_path: Any
) -> None:
    """Issue 10, item 9: as a faust timer the relay's tick ran 0.2-0.75 s under a drain for a
    0.2 s interval, and faust logged `Timer outbox_relay is overlapping`. As a loop it drains while
    there is work, waits only when there is none, and every billing event arrives once."""
    from tests.conftest import live_deployment

    turns = 300
    env = {"MINICHAT_RELAY_INTERVAL_S": "0.02", "MINICHAT_RELAY_BATCH_MAX": "20"}
    async with live_deployment(endpoints, template_database, tmp_path, env=env) as live:
        gw = live.gateway
        tenant = uuid.uuid4()
        commands = [gw.requested(tenant, uuid.uuid4(), uuid.uuid4()) for _ in range(turns)]
        assert {d["decision"] for d in await gw.decide(*commands, timeout=120)} == {"allow"}
        usage = {"input_tokens": 3, "output_tokens": 4}
        await gw.send_provider(
            *(gw.provider("turn.completed", c, content="ok", usage=usage) for c in commands)
        )
        topic = TopicNames(live.settings.topic_prefix).billing_usage
        async with TopicReader(endpoints.kafka, topic) as billing:
            found = await billing.wait_for(
                lambda vs: len(vs) >= turns, timeout=120, what="every billing event"
            )
        assert len({v["dedupe_key"] for v in found}) == turns
        assert not any("overlapping" in w.log() for w in live.workers)
