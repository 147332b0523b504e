"""What the tools read of Kafka: a topic's partitions, a topic up to its end, and the workers' lag
(records their consumer group has not committed yet)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from minichat.kafka_security import kafka_client_options
from minichat.models.topics import INPUT_TOPICS, TopicNames
from minichat.settings import Settings


async def topic_partitions(settings: Settings, topics: Sequence[str]) -> dict[str, list[TopicPartition]]:
    """The partitions of each existing topic (a missing topic is left out)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        return await partitions_of(admin, topics)
    finally:
        await admin.close()


async def partitions_of(admin: Any, topics: Sequence[str]) -> dict[str, list[TopicPartition]]:
    """`topic_partitions` with an admin client the caller started."""
    described = await admin.describe_topics(list(topics))
    return {
        t["topic"]: [
            TopicPartition(t["topic"], p["partition"]) for p in sorted(t["partitions"], key=_partition)
        ]
        for t in described
        if t["error_code"] == 0 and t["partitions"]
    }


def _partition(p: dict[str, Any]) -> int:
    return int(p["partition"])


async def read_topic(
    settings: Settings, topic: str, *, within: float = 60.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of `topic` up to the end offsets taken at the start: (key, value) pairs. Raises
    `TimeoutError` when those offsets are not reached `within` seconds."""
    tps = (await topic_partitions(settings, [topic])).get(topic, [])
    if not tps:
        return []
    consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + within
        pending = {tp for tp in tps if end[tp] > 0}
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: end offsets not reached in {within}s")
            batches = await consumer.getmany(*pending, timeout_ms=200)
            for tp, batch in batches.items():
                records.extend((r.key, r.value) for r in batch if r.offset < end[tp])
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        return records
    finally:
        await consumer.stop()


class InputLag:
    """Records on the input topics that the workers' consumer group has not committed yet.
    One admin client and one consumer, reused across measurements."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin = AIOKafkaAdminClient(**kafka_client_options(settings))
        self._consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> InputLag:
        names = TopicNames(self._settings.topic_prefix)
        topics = [names.full(t) for t in INPUT_TOPICS]
        found = await topic_partitions(self._settings, topics)
        self._partitions = [tp for t in topics for tp in found.get(t, [])]
        await self._admin.start()
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def measure(self, *, retry_for_s: float = 60.0) -> int:
        """The lag now. A retriable error (a broker of a cluster down, the group coordinator
        moving) is asked again for up to `retry_for_s`: a failover is not the tool's failure."""
        tps = self._partitions
        deadline = time.monotonic() + retry_for_s
        while True:
            try:
                end = await self._consumer.end_offsets(tps)
                committed = await self._admin.list_consumer_group_offsets(
                    self._settings.group_id, partitions=tps
                )
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                continue
            return sum(max(end[tp] - committed_offset(committed, tp), 0) for tp in tps)


def committed_offset(committed: Mapping[TopicPartition, Any], tp: TopicPartition) -> int:
    """The offset a consumer group committed for `tp` (`list_consumer_group_offsets`), 0 for none."""
    meta = committed.get(tp)
    return int(meta.offset) if meta is not None and meta.offset >= 0 else 0
