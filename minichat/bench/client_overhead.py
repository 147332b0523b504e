"""What `minichat.client` costs a gateway: `request_turn` against a raw produce + consume.

One worker, caught up. Per round, `instances` gateway instances each send `requests` commands one
after the other (each to a new chat), timing every call from just before the send to the decision
in hand:

* client: `GatewayClient.request_turn` (typed event, idempotent producer, reads only the decision
  partitions of its chats in flight, pydantic-validated decision);
* raw: an `AIOKafkaProducer.send_and_wait` of the same JSON and a consumer of *every*
  `turn-decisions` partition that matches `command_event_id` in the parsed JSON: the least a
  gateway can do.

Both include the worker's own decision time, which is the same for both: the difference is what
the client adds.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from minichat.bench.latency import percentiles
from minichat.bench.options import BenchOptions
from minichat.bench.progress import say
from minichat.bench.scratch import deployment
from minichat.bench.workers import running_workers
from minichat.client import GatewayClient
from minichat.kafka_security import gateway_security_arguments, kafka_client_options
from minichat.models import events
from minichat.models.policy import CatalogModel
from minichat.models.topics import TopicNames
from minichat.settings import Settings
from minichat.tasks import cancel_and_wait

INSTANCES = (1, 8)


@dataclass(frozen=True)
class OverheadRound:
    instances: int
    requests: int
    client_ms: dict[str, float]
    raw_ms: dict[str, float]
    client_partitions_read: float
    """The most decision partitions one client instance read at once, on average over the
    instances (the raw consumer reads all of them)."""
    partitions: int


@dataclass
class OverheadResult:
    rounds: list[OverheadRound] = field(default_factory=list)


def _command(model: CatalogModel) -> events.TurnRequested:
    return events.TurnRequested(
        event_id=uuid.uuid4(),
        schema_version=1,
        occurred_at=datetime.now(UTC),
        tenant_id=uuid.uuid4(),
        chat_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
        content="hello",
        model=model.id,
    )


async def _client_instance(settings: Settings, model: CatalogModel, requests: int) -> tuple[list[float], int]:
    times: list[float] = []
    async with GatewayClient(
        settings.kafka_bootstrap_servers, settings.topic_prefix, **gateway_security_arguments(settings)
    ) as client:
        for _ in range(requests):
            command = _command(model)
            started = time.perf_counter()
            await client.send_command(command, timeout_s=60)
            times.append((time.perf_counter() - started) * 1000)
        return times, client.most_partitions_read


async def _raw_instance(settings: Settings, model: CatalogModel, requests: int) -> list[float]:
    names = TopicNames(settings.topic_prefix)
    producer = AIOKafkaProducer(**kafka_client_options(settings), acks="all", enable_idempotence=True)
    consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
    waiting: dict[str, asyncio.Future[None]] = {}

    async def read() -> None:
        while True:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    future = waiting.pop(json.loads(record.value)["command_event_id"], None)
                    if future is not None and not future.done():
                        future.set_result(None)

    await producer.start()
    await consumer.start()
    reader: asyncio.Task[None] | None = None
    try:
        tps = [
            TopicPartition(names.turn_decisions, p)
            for p in sorted(consumer.partitions_for_topic(names.turn_decisions) or [])
        ]
        if not tps:
            tps = [TopicPartition(names.turn_decisions, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        reader = asyncio.create_task(read())
        times: list[float] = []
        for _ in range(requests):
            command = _command(model)
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            waiting[str(command.event_id)] = future
            await producer.send_and_wait(
                names.turn_requests, events.to_json_bytes(command), key=str(command.chat_id).encode()
            )
            await asyncio.wait_for(future, 60)
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        await cancel_and_wait(reader)
        await consumer.stop()
        await producer.stop()


async def run_client_overhead(
    base: Settings, policy_file: Path, model: CatalogModel, options: BenchOptions, workdir: Path
) -> OverheadResult:
    result = OverheadResult()
    requests = options.client_requests
    async with (
        deployment(base, "client", policy_file) as settings,
        running_workers(settings, 1, workdir) as workers,
    ):
        await _client_instance(settings, model, 5)  # warm-up: the worker is in its group and answering
        for instances in INSTANCES:
            say(f"client overhead: {instances} instance(s) x {requests} requests, client then raw")
            client = await asyncio.gather(
                *(_client_instance(settings, model, requests) for _ in range(instances))
            )
            raw = await asyncio.gather(*(_raw_instance(settings, model, requests) for _ in range(instances)))
            client_ms = [t for times, _ in client for t in times]
            raw_ms = [t for times in raw for t in times]
            result.rounds.append(
                OverheadRound(
                    instances=instances,
                    requests=len(client_ms),
                    client_ms=_ms(client_ms),
                    raw_ms=_ms(raw_ms),
                    client_partitions_read=sum(read for _, read in client) / instances,
                    partitions=settings.partitions,
                )
            )
        await workers[0].stop()
    return result


def _ms(values: list[float]) -> dict[str, float]:
    ranked = percentiles([round(v * 1000) for v in values])  # microseconds, integers
    return {k: v / 1000 for k, v in ranked.items()}
