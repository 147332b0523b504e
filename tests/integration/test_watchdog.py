"""The watchdog against the real broker and database: one signal per staleness, on the processing clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from minichat.domain.ids import grace_expired_event_id, orphaned_event_id, turn_id_for
from minichat.models.events import TurnOrphaned, UsageGraceExpired, decode_provider_event, decode_usage_event
from minichat.models.topics import TopicNames
from minichat.processors.errors import RetryPolicy
from minichat.processors.leadership import WATCHDOG_LOCK, ExclusiveSession
from minichat.processors.pipeline import Producer
from minichat.processors.watchdog import Sweep, Watchdog
from tests.conftest import Deployment
from tests.integration.test_relay import KafkaProducer, read_to_end

pytestmark = pytest.mark.integration

TIMEOUT = timedelta(seconds=60)
LONG_AGO = timedelta(hours=1)
EVENT_TIME = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Turn:
    id: uuid.UUID
    tenant_id: uuid.UUID
    chat_id: uuid.UUID
    request_id: uuid.UUID


async def add_turn(
    con: asyncpg.Connection,
    *,
    state: str = "running",
    progress_seq: int = 0,
    progress_seen_ago: timedelta = timedelta(0),
    terminal_seen_ago: timedelta | None = None,
    settled: bool = False,
    started_at: datetime = EVENT_TIME,
) -> Turn:
    """A chat with one turn; `*_ago` set the processing-clock columns relative to the database's now()."""
    tenant, user, chat, request = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    turn = Turn(turn_id_for(chat, request), tenant, chat, request)
    await con.execute(
        "INSERT INTO chats (id, tenant_id, user_id, model, created_at, updated_at)"
        " VALUES ($1, $2, $3, 'gpt-5-mini', $4, $4)",
        chat,
        tenant,
        user,
        started_at,
    )
    terminal_at = None if state == "running" else started_at + timedelta(seconds=5)
    await con.execute(
        """
        INSERT INTO chat_turns (id, tenant_id, chat_id, request_id, requester_type, requester_user_id, state,
            selected_model, effective_model, reserve_tokens, max_output_tokens_applied,
            reserved_credits_micro, policy_version_applied, minimal_generation_floor_applied,
            period_daily, period_monthly, started_at, updated_at, completed_at, terminal_at,
            progress_seq, last_progress_seen_at, terminal_seen_at, settled_at, billing_outcome,
            settlement_method, committed_credits_micro)
        VALUES ($1, $2, $3, $4, 'user', $5, $6, 'gpt-5-mini', 'gpt-5-mini', 100, 50, 10, 1, 10,
            $7, $8, $9, $9, $10, $10, $11, now() - $12::interval, now() - $13::interval,
            $14, $15, $16, $17)
        """,
        turn.id,
        tenant,
        chat,
        request,
        user,
        state,
        started_at.date(),
        date(started_at.year, started_at.month, 1),
        started_at,
        terminal_at,
        progress_seq,
        progress_seen_ago,
        terminal_seen_ago,
        terminal_at if settled else None,
        "completed" if settled else None,
        "estimated" if settled else None,
        7 if settled else None,
    )
    return turn


@pytest.fixture
async def db(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(deployment.settings.database_url)
    yield con
    await con.close()


@pytest.fixture
async def producer(deployment: Deployment) -> AsyncIterator[KafkaProducer]:
    producer = KafkaProducer(deployment.settings.kafka_bootstrap_servers)
    await producer.start()
    yield producer
    await producer.stop()


WatchdogFactory = Callable[[], Watchdog]


@pytest.fixture
async def make_watchdog(deployment: Deployment, producer: KafkaProducer) -> AsyncIterator[WatchdogFactory]:
    sessions: list[ExclusiveSession] = []

    async def get_producer() -> Producer:
        return producer

    def make() -> Watchdog:
        session = ExclusiveSession(
            deployment.settings.database_url, WATCHDOG_LOCK, f"watchdog-{len(sessions)}"
        )
        sessions.append(session)
        return Watchdog(
            session=session,
            producer=get_producer,
            topics=TopicNames(deployment.settings.topic_prefix),
            orphan_timeout_s=TIMEOUT.total_seconds(),
            usage_grace_s=TIMEOUT.total_seconds(),
            retry=RetryPolicy(initial_s=0.01, max_backoff_s=0.1, give_up_after_s=10),
        )

    yield make
    for session in sessions:
        await session.close()


async def orphaned_events(deployment: Deployment) -> list[TurnOrphaned]:
    topic = TopicNames(deployment.settings.topic_prefix).provider_responses
    events = []
    for record in await read_to_end(deployment, topic):
        event = decode_provider_event(record.key, record.value)
        assert isinstance(event, TurnOrphaned)
        events.append(event)
    return events


async def grace_events(deployment: Deployment) -> list[UsageGraceExpired]:
    topic = TopicNames(deployment.settings.topic_prefix).usage
    events = []
    for record in await read_to_end(deployment, topic):
        event = decode_usage_event(record.key, record.value)
        assert isinstance(event, UsageGraceExpired)
        events.append(event)
    return events


async def test_a_stale_running_turn_is_orphaned_once(
    deployment: Deployment, db: asyncpg.Connection, make_watchdog: WatchdogFactory
) -> None:
    # Event time says the opposite of the processing clock: only the processing clock counts.
    stale = await add_turn(db, progress_seq=3, progress_seen_ago=LONG_AGO, started_at=datetime.now(UTC))
    await add_turn(db, progress_seq=1, started_at=datetime(2020, 1, 1, tzinfo=UTC))
    await add_turn(db, progress_seen_ago=TIMEOUT - timedelta(seconds=10))
    watchdog = make_watchdog()

    assert await watchdog.tick() == Sweep(orphaned=1)
    [event] = await orphaned_events(deployment)
    assert (event.tenant_id, event.chat_id, event.request_id) == (
        stale.tenant_id,
        stale.chat_id,
        stale.request_id,
    )
    assert event.progress_seq == 3
    assert event.event_id == orphaned_event_id(stale.id, 3)
    assert await db.fetchval(
        "SELECT orphan_sent_at > now() - interval '1 minute' FROM chat_turns"
        " WHERE tenant_id = $1 AND id = $2",
        stale.tenant_id,
        stale.id,
    )
    assert await db.fetchval("SELECT count(*) FROM chat_turns WHERE orphan_sent_at IS NOT NULL") == 1
    assert await db.fetchval("SELECT count(*) FROM chat_turns WHERE state <> 'running'") == 0

    assert await watchdog.tick() == Sweep()
    assert len(await orphaned_events(deployment)) == 1
    assert await grace_events(deployment) == []


async def test_the_signal_is_sent_again_only_after_another_timeout(
    deployment: Deployment, db: asyncpg.Connection, make_watchdog: WatchdogFactory
) -> None:
    turn = await add_turn(db, progress_seq=3, progress_seen_ago=LONG_AGO)
    watchdog = make_watchdog()
    assert await watchdog.tick() == Sweep(orphaned=1)

    # Still running a timeout later (the signal lost a race with progress 4, say): sent again, with
    # the progress the turn has now.
    await db.execute(
        "UPDATE chat_turns SET progress_seq = 4, orphan_sent_at = now() - $3::interval"
        " WHERE tenant_id = $1 AND id = $2",
        turn.tenant_id,
        turn.id,
        TIMEOUT + timedelta(seconds=1),
    )
    assert await watchdog.tick() == Sweep(orphaned=1)
    assert [(e.progress_seq, e.event_id) for e in await orphaned_events(deployment)] == [
        (3, orphaned_event_id(turn.id, 3)),
        (4, orphaned_event_id(turn.id, 4)),
    ]


async def test_a_terminal_turn_waiting_for_usage_past_the_grace_gets_grace_expired(
    deployment: Deployment, db: asyncpg.Connection, make_watchdog: WatchdogFactory
) -> None:
    waiting = await add_turn(db, state="completed", terminal_seen_ago=LONG_AGO)
    await add_turn(db, state="completed", terminal_seen_ago=LONG_AGO, settled=True)
    await add_turn(db, state="cancelled", terminal_seen_ago=TIMEOUT - timedelta(seconds=10))
    watchdog = make_watchdog()

    assert await watchdog.tick() == Sweep(grace_expired=1)
    [event] = await grace_events(deployment)
    assert (event.tenant_id, event.chat_id, event.request_id) == (
        waiting.tenant_id,
        waiting.chat_id,
        waiting.request_id,
    )
    assert event.event_id == grace_expired_event_id(waiting.id)
    assert await db.fetchval("SELECT count(*) FROM chat_turns WHERE grace_sent_at IS NOT NULL") == 1
    assert await db.fetchval("SELECT count(*) FROM chat_turns WHERE settled_at IS NULL") == 2

    assert await watchdog.tick() == Sweep()
    assert len(await grace_events(deployment)) == 1
    assert await orphaned_events(deployment) == []


async def test_a_second_watchdog_does_nothing_while_the_lock_is_held(
    deployment: Deployment, db: asyncpg.Connection, make_watchdog: WatchdogFactory
) -> None:
    await add_turn(db, progress_seen_ago=LONG_AGO)
    await add_turn(db, state="failed", terminal_seen_ago=LONG_AGO)
    holder = await asyncpg.connect(deployment.settings.database_url)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", *WATCHDOG_LOCK)
        assert await make_watchdog().tick() == Sweep()
        assert await orphaned_events(deployment) == []
        assert await grace_events(deployment) == []
    finally:
        await holder.close()
    assert await make_watchdog().tick() == Sweep(orphaned=1, grace_expired=1)


async def test_a_tick_is_bounded(
    deployment: Deployment, db: asyncpg.Connection, make_watchdog: WatchdogFactory
) -> None:
    for _ in range(5):
        await add_turn(db, progress_seen_ago=LONG_AGO)
    watchdog = make_watchdog()
    watchdog.batch_max = 3
    assert await watchdog.tick() == Sweep(orphaned=3)
    assert await watchdog.tick() == Sweep(orphaned=2)
    assert await watchdog.tick() == Sweep()
    assert len({e.request_id for e in await orphaned_events(deployment)}) == 5
