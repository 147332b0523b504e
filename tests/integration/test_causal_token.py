"""The causal token `after` against a real worker: a command that sorts before the terminal event it
names (what a skewed broker clock does) waits for it; without the token the same records are
refused `generation_in_progress`; a token naming nothing is released once its lane is read to its
end (counted) and deadlocks nothing; a rebuild of it all has the live digest.

The skew is made deterministic on one broker: with the worker stopped, the next command is
appended before the previous turn's terminal event (so its timestamp is earlier) and names the
offset the terminal event then takes; the worker started afterwards finds both in the log."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from minichat.bench.workers import free_port
from minichat.client import partition_of
from minichat.models.topics import TopicNames
from minichat.settings import Settings
from tests.conftest import Deployment
from tests.gateway import Gateway
from tests.integration.test_ordered_engine import count, fresh, live_digest, metric_sums, rebuilt_digest
from tests.support import Endpoints, TopicReader, run_worker, wait_until

pytestmark = pytest.mark.integration


async def send(producer: AIOKafkaProducer, topic: str, event: dict[str, Any]) -> Any:
    """Produce and wait for the acknowledgement (its offset and LogAppendTime)."""
    return await producer.send_and_wait(topic, json.dumps(event).encode(), key=event["chat_id"].encode())


async def end_offset(settings: Settings, topic: str, partition: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        ends = await consumer.end_offsets([tp])
        return int(ends[tp])
    finally:
        await consumer.stop()


async def decision_of(reader: TopicReader, command: dict[str, Any]) -> dict[str, Any]:
    values = await reader.wait_for(
        lambda vs: any(v["command_event_id"] == command["event_id"] for v in vs),
        timeout=60,
        what=f"the decision of {command['type']}",
    )
    return next(v for v in values if v["command_event_id"] == command["event_id"])


async def settled(settings: Settings, turns: int) -> None:
    url = settings.database_url

    async def done() -> bool:
        total = await count(url, "SELECT count(*) FROM chat_turns")
        unsettled = await count(url, "SELECT count(*) FROM chat_turns WHERE settled_at IS NULL")
        parked = await count(url, "SELECT count(*) FROM parked_events")
        return total == turns and unsettled == 0 and parked == 0

    await wait_until(done, timeout=120, what=f"{turns} turns settled, nothing parked")


@pytest.mark.timeout(300)
async def test_a_command_sorting_before_the_terminal_event_it_names_waits_for_it(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with fresh(endpoints, template_database, tmp_path) as settings:
        names = TopicNames(settings.topic_prefix)
        g = Gateway(settings, None)  # type: ignore[arg-type]
        tenant, user = uuid.uuid4(), uuid.uuid4()
        token_chat, plain_chat, nothing_chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        firsts = {chat: g.requested(tenant, user, chat) for chat in (token_chat, plain_chat, nothing_chat)}
        port = free_port()
        env = {**Deployment(settings).env(), "MINICHAT_WEB_ENABLED": "true", "MINICHAT_WEB_PORT": str(port)}
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
                # Turn 1 of each chat is accepted and runs; that of `nothing_chat` also completes.
                with run_worker(env, tmp_path / "w1.log") as worker:
                    for first in firsts.values():
                        await send(producer, names.turn_requests, first)
                        assert (await decision_of(reader, first))["decision"] == "allow"
                    done = g.provider("turn.completed", firsts[nothing_chat], content="answer")
                    await send(producer, names.provider_responses, done)
                    await send(producer, names.usage, g.usage(firsts[nothing_chat], 30, 40))
                    await settled_one(settings)
                    assert worker.terminate() == 0

                # With the worker stopped: each next command is appended BEFORE the previous turn's
                # terminal event, so it sorts first by timestamp.
                partition = partition_of(token_chat, settings.partitions)
                named = await end_offset(settings, names.provider_responses, partition)
                plain_next = g.requested(tenant, user, plain_chat, model=None)
                token_next = g.requested(
                    tenant, user, token_chat, model=None, after={"provider-responses": named}
                )
                nothing_next = g.requested(tenant, user, nothing_chat, model=None, after={"usage": 10**12})
                plain_ack = await send(producer, names.turn_requests, plain_next)
                await send(producer, names.turn_requests, token_next)
                await send(producer, names.turn_requests, nothing_next)
                token_done = g.provider("turn.completed", firsts[token_chat], content="answer")
                token_ack = await send(producer, names.provider_responses, token_done)
                assert (token_ack.partition, token_ack.offset) == (partition, named)
                # the control's terminal event a millisecond later at least (same ms: facts first)
                await wait_until(next_ms(plain_ack.timestamp), timeout=5, what="the next millisecond")
                plain_done = g.provider("turn.completed", firsts[plain_chat], content="answer")
                plain_done_ack = await send(producer, names.provider_responses, plain_done)
                assert plain_done_ack.timestamp > plain_ack.timestamp

                with run_worker(env, tmp_path / "w2.log") as worker:
                    with_token = await decision_of(reader, token_next)
                    without = await decision_of(reader, plain_next)
                    past_the_end = await decision_of(reader, nothing_next)
                    assert with_token["decision"] == "allow", with_token
                    assert (without["decision"], without["error_code"]) == (
                        "reject",
                        "generation_in_progress",
                    )
                    assert past_the_end["decision"] == "allow", past_the_end
                    metrics = await wait_until(lambda: metric_sums(port), timeout=30, what="metrics")
                    assert metrics.get("minichat_after_satisfied_by_offset_total", 0) >= 1
                    assert metrics.get("minichat_after_satisfied_by_end_total", 0) >= 1
                    # the turns the second commands started end, and everything settles
                    for command in (token_next, nothing_next):
                        finished = g.provider("turn.completed", command, content="more")
                        await send(producer, names.provider_responses, finished)
                    # their usage, so that every turn settles now rather than after the usage grace
                    for command in (firsts[token_chat], firsts[plain_chat], token_next, nothing_next):
                        await send(producer, names.usage, g.usage(command, 30, 40))
                    await settled(settings, turns=5)
                    assert worker.terminate() == 0
        finally:
            await producer.stop()
        assert await live_digest(settings.database_url) == await rebuilt_digest(
            settings, endpoints, template_database
        )


def next_ms(after_ms: int) -> Callable[[], Awaitable[bool]]:
    async def passed() -> bool:
        return time.time() * 1000 > after_ms + 1

    return passed


async def settled_one(settings: Settings) -> None:
    """The completed first turn settled (its usage applied)."""

    async def done() -> bool:
        sql = "SELECT count(*) FROM chat_turns WHERE settled_at IS NOT NULL"
        return await count(settings.database_url, sql) == 1

    await wait_until(done, timeout=60, what="the first completed turn settled")
