"""Where a worker resumes, on the real broker and database (docs/guarantees.md, "Positions under faults").

* a zombie owner's batch commits while the new owner's first batch waits on the position rows:
  the new owner re-reads every lane of its batch's sets, so nothing is skipped, nothing applied
  twice, every command answered once, and the rebuild has the live digest;
* two owners of partitions that have no stored row yet: only one passes the claim;
* the group's Kafka offsets deleted (as the broker does after `offsets.retention.minutes`): the
  worker resumes at the stored positions, re-sending nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from aiokafka.protocol.admin import DeleteGroupsRequest

from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.engine import OrderedEngine
from minichat.processors.pipeline import Decoded
from minichat.processors.records import Output, source_record
from minichat.settings import Settings
from minichat.storage.coordination import PositionConflict, claim_positions, load_positions, store_positions
from minichat.storage.db import create_pool
from tests.conftest import Deployment
from tests.gateway import Event, Gateway
from tests.integration.test_ordered_engine import (
    Traffic,
    count,
    fresh,
    live_digest,
    quiet,
    rebuilt_digest,
)
from tests.support import DeadlineExceeded, Endpoints, TopicReader, run_worker, wait_until

pytestmark = pytest.mark.integration

CONFLICT = "stored positions moved under this worker"


async def lock_waits(url: str) -> int:
    """Backends of this database waiting for a lock (a row lock shows as a transaction id lock)."""
    return await count(
        url,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE NOT l.granted AND a.datname = current_database()",
    )


class Chats:
    """Chats whose partition the test knows, and their events, produced one by one (acked)."""

    def __init__(self, settings: Settings, n: int) -> None:
        self.settings = settings
        self.names = TopicNames(settings.topic_prefix)
        self.gateway = Gateway(settings, None)  # type: ignore[arg-type]
        tenant = uuid.uuid4()
        users = [uuid.uuid4() for _ in range(4)]
        self.chats = [(tenant, users[i % 4], uuid.uuid4()) for i in range(n)]
        self.commands = 0

    def partition(self, chat: uuid.UUID) -> int:
        return (murmur2(str(chat).encode()) & 0x7FFFFFFF) % self.settings.partitions

    async def send(self, events: list[tuple[str, Event]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            for topic, event in events:
                key = str(event["chat_id"]).encode()
                await (await producer.send(topic, json.dumps(event).encode(), key=key))
                self.commands += topic == self.names.turn_requests
        finally:
            await producer.stop()


@pytest.mark.timeout(300)
async def test_a_position_conflict_rereads_every_lane_of_the_batch_and_skips_nothing(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    """The issue's interleaving. Worker W decides every chat's first request and stops. The gateway
    then sends the completions of partition 0's chats, then everything else (usage, the other
    completions, a second turn). A zombie owner of set 0 (the engine's own statements on its own
    connection: claim, apply, store) holds `provider-responses[0]`'s row while the new owner B
    starts; B's batch waits on that row; the zombie applies the completions and commits, moving
    only `provider-responses[0]`. B's batch then conflicts: every record it held of every other
    lane must still be applied (before: only `provider-responses[0]` was re-read, and B's
    `turn-requests` and `usage` records of that batch were never applied)."""
    async with fresh(endpoints, template_database, tmp_path) as settings:
        names = TopicNames(settings.topic_prefix)
        inputs = [names.turn_requests, names.provider_responses, names.usage]
        url = settings.database_url
        con = await asyncpg.connect(url)
        try:  # rows for every partition (so the zombie's claim locks one, whatever the engine makes)
            every = {(t, p): 0 for t in inputs for p in range(settings.partitions)}
            await store_positions(con, settings.group_id, every)
        finally:
            await con.close()
        chats = Chats(settings, 24)
        g = chats.gateway
        first = {chat: g.requested(*chat, content="first") for chat in chats.chats}
        await chats.send([(names.turn_requests, first[chat]) for chat in chats.chats])
        env = Deployment(settings).env()
        with run_worker(env, tmp_path / "w.log") as w:
            await wait_until(
                lambda: count(url, "SELECT count(*) = 24 FROM turn_decisions"), timeout=90, what="W decides"
            )
            await asyncio.to_thread(w.terminate)
        on_zero = [chat for chat in chats.chats if chats.partition(chat[2]) == 0]
        assert on_zero, "no chat on partition 0: change the chat count"
        await chats.send(
            [
                (names.provider_responses, g.provider("turn.completed", first[c], content="answer"))
                for c in on_zero
            ]
        )
        later: list[tuple[str, Event]] = []
        for chat in chats.chats:
            if chat not in on_zero:
                later.append(
                    (names.provider_responses, g.provider("turn.completed", first[chat], content="answer"))
                )
            later.append((names.usage, g.usage(first[chat], 100, 20)))
            second = g.requested(*chat, content="second")
            later += [
                (names.turn_requests, second),
                (names.provider_responses, g.provider("turn.completed", second, content="answer")),
                (names.usage, g.usage(second, 200, 30)),
            ]
        await chats.send(later)

        # The zombie: still applying set 0 as the old owner, its batch the completions on pr[0].
        zombie_lane = (names.provider_responses, 0)
        zombie = await asyncpg.connect(url)
        try:
            transaction = zombie.transaction()
            await transaction.start()
            stored = await load_positions(zombie, settings.group_id, [zombie_lane])
            await claim_positions(zombie, settings.group_id, stored)
            with run_worker(env, tmp_path / "b.log") as b:
                await wait_until(lambda: lock_waits(url), timeout=90, what="B's batch waiting on the row")
                batches = build_batches(settings, load_policy(settings.policy_file))
                records = await read_partition(settings, zombie_lane, stored[zombie_lane], len(on_zero))
                good = [d for d in batches.decode(records) if isinstance(d, Decoded)]
                outputs: list[Output] = await batches.apply(zombie, good)
                assert not [o for o in outputs if o.topic == names.turn_decisions]
                await store_positions(zombie, settings.group_id, {zombie_lane: records[-1].offset + 1})
                await transaction.commit()
                try:
                    await quiet(settings, chats.commands, timeout=90)
                except DeadlineExceeded:
                    decided = await count(url, "SELECT count(*) FROM turn_decisions")
                    actual = await count(
                        url, "SELECT count(*) FROM chat_turns WHERE settlement_method = 'actual'"
                    )
                    raise AssertionError(
                        f"records skipped: {decided} of 48 commands decided, {actual} turns settled on"
                        " their reported usage"
                    ) from None
                assert CONFLICT in b.log()  # the interleaving happened
        finally:
            await zombie.close()
        async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
            values = await reader.wait_for(lambda v: len(v) >= chats.commands, timeout=60)
        assert len(values) == chats.commands == 48  # every command answered once
        assert len({v["command_event_id"] for v in values}) == chats.commands
        assert not any(v["replay"] for v in values)
        # every usage.reported applied once: every turn settled on its actual usage, charged once
        assert await count(url, "SELECT count(*) FROM chat_turns WHERE settlement_method = 'actual'") == 48
        charged = await count(url, "SELECT sum(committed_credits_micro) FROM chat_turns")
        spent = await count(
            url,
            "SELECT sum(spent_credits_micro) FROM quota_usage"
            " WHERE bucket = 'total' AND period_type = 'daily'",
        )
        assert charged == spent
        assert await live_digest(url) == await rebuilt_digest(settings, endpoints, template_database)


async def read_partition(settings: Settings, lane: tuple[str, int], start: int, n: int) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(*lane)
        consumer.assign([tp])
        consumer.seek(tp, start)
        records: list[Any] = []
        while len(records) < n:
            fetched = await consumer.getmany(tp, timeout_ms=1000)
            records += [source_record(r) for r in fetched.get(tp, [])]
        return records[:n]
    finally:
        await consumer.stop()


@pytest.mark.timeout(120)
async def test_two_owners_of_partitions_without_a_stored_row_never_both_pass_the_claim(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    """Two engines resume set 0 (no position row yet) and apply a batch at once. Before, the claim
    locked nothing (no row) and both passed; now the rows exist from the assignment on, the second
    waits for the first and finds them moved."""
    async with fresh(endpoints, template_database, tmp_path) as settings:
        names = TopicNames(settings.topic_prefix)
        lanes = [(t, 0) for t in (names.turn_requests, names.provider_responses, names.usage)]
        pool = await create_pool(settings)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.group_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(*lane) for lane in lanes])

            async def the_pool() -> asyncpg.Pool:
                return pool

            def fatal(what: str, exc: BaseException) -> None:
                raise AssertionError(what) from exc

            engines = [
                OrderedEngine(
                    settings, build_batches(settings, load_policy(settings.policy_file)), the_pool, fatal
                )
                for _ in range(2)
            ]
            for engine in engines:  # both believe they own set 0
                engine.assigned.update(lanes)
                await engine._seek(consumer, lanes)
            passed: list[str] = []
            inside, release = asyncio.Event(), asyncio.Event()

            def batch(name: str, hold: bool) -> Callable[[asyncpg.Connection], Any]:
                async def apply(con: asyncpg.Connection) -> list[Output]:
                    passed.append(name)
                    if hold:
                        inside.set()
                        await release.wait()
                    return []

                return apply

            offsets = {lane: 1 for lane in lanes}
            a = asyncio.create_task(engines[0]._transaction(offsets, batch("A", hold=True)))
            await inside.wait()
            b = asyncio.create_task(engines[1]._transaction(offsets, batch("B", hold=False)))

            async def b_waits_or_passed() -> bool:
                return b.done() or await lock_waits(settings.database_url) > 0

            await wait_until(b_waits_or_passed, timeout=30, what="B waiting on the claim")
            release.set()
            await a
            with pytest.raises(PositionConflict):
                await b
            assert passed == ["A"]
        finally:
            release.set()
            await consumer.stop()
            await pool.close()


async def delete_group(settings: Settings) -> None:
    """What the broker does to an idle group's offsets after `offsets.retention.minutes`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        coordinator = await admin.find_coordinator(settings.group_id)
        response = await admin._send_request_to_node(coordinator, DeleteGroupsRequest([settings.group_id]))
        assert [error for _, error in response.results] == [0]
    finally:
        await admin.close()


@pytest.mark.timeout(300)
async def test_expired_group_offsets_resume_at_the_stored_positions(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    """Before, a partition without a Kafka committed offset resumed at the log's beginning: the
    whole history re-applied and every decision re-sent with `replay: true`."""
    async with fresh(endpoints, template_database, tmp_path) as settings:
        names = TopicNames(settings.topic_prefix)
        env = Deployment(settings).env()
        first = Traffic(settings, tenants=2, users=4, chats=12, turns=2, seed=3)
        await first.play()
        with run_worker(env, tmp_path / "w1.log") as w:
            await quiet(settings, first.commands)
            await asyncio.to_thread(w.terminate)
        await delete_group(settings)
        second = Traffic(settings, tenants=2, users=4, chats=12, turns=1, seed=4)
        await second.play()
        total = first.commands + second.commands
        with run_worker(env, tmp_path / "w2.log") as w2:
            await quiet(settings, total)
            async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
                values = await reader.wait_for(lambda v: len(v) >= total, timeout=60)
            assert "committed None" in w2.log()  # the group's offsets were gone
        assert len(values) == total
        assert not [v for v in values if v["replay"]]


@pytest.mark.timeout(120)
async def test_a_split_batch_whose_final_store_conflicts_still_sends_its_committed_decisions(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    """A batch split into two groups: both commit, then another owner moves the positions before
    the batch's own store. The groups' decisions are committed facts and must leave (before: they
    were dropped unsent, and nothing re-sent them to this worker's knowledge)."""
    async with fresh(
        endpoints, template_database, tmp_path, apply_parallel=2, apply_parallel_min=2
    ) as settings:
        names = TopicNames(settings.topic_prefix)
        chats = Chats(settings, 40)
        on_zero: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]] = []
        for chat in chats.chats:  # two chats of set 0 that share no user: two groups
            if chats.partition(chat[2]) == 0 and all(chat[1] != other[1] for other in on_zero):
                on_zero.append(chat)
        on_zero = on_zero[:2]
        assert len(on_zero) == 2
        requests = [chats.gateway.requested(*c, content="hi") for c in on_zero]
        await chats.send([(names.turn_requests, r) for r in requests])
        lane = (names.turn_requests, 0)
        records = await read_partition(settings, lane, 0, 2)
        url = settings.database_url

        class Raced(OrderedEngine):
            async def _apply_groups(self, offsets: Any, groups: Any, owners: Any) -> list[Output]:
                outputs: list[Output] = await super()._apply_groups(offsets, groups, owners)
                other = await asyncpg.connect(url)  # another owner's batch moves the positions
                try:
                    await store_positions(other, settings.group_id, offsets)
                finally:
                    await other.close()
                return outputs

        pool = await create_pool(settings)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.group_id,
            enable_auto_commit=False,
        )
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
        await consumer.start()
        await producer.start()
        try:
            lanes = [(t, 0) for t in (names.turn_requests, names.provider_responses, names.usage)]
            consumer.assign([TopicPartition(*x) for x in lanes])

            async def the_pool() -> asyncpg.Pool:
                return pool

            def fatal(what: str, exc: BaseException) -> None:
                raise AssertionError(what) from exc

            batches = build_batches(settings, load_policy(settings.policy_file))
            engine = Raced(settings, batches, the_pool, fatal)
            engine._producer = producer
            engine.assigned.update(lanes)
            await engine._seek(consumer, lanes)
            await engine._apply(consumer, records)
            await engine._flights.await_all()
            assert batches.metrics.value("minichat_batch_groups_total") == 2
            async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
                values = await reader.wait_for(lambda v: len(v) >= 2, timeout=20)
            assert sorted(v["command_event_id"] for v in values) == sorted(
                str(r["event_id"]) for r in requests
            )
            assert not any(v["replay"] for v in values)
        finally:
            await producer.stop()
            await consumer.stop()
            await pool.close()
