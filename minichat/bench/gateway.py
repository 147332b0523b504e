"""The bench's gateway: produces a turn's command and facts and waits for the broker's acks."""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiokafka import AIOKafkaProducer

from minichat.bench.traffic import Chat, Turn
from minichat.kafka_security import kafka_client_options
from minichat.models.topics import TopicNames
from minichat.partitioning import KeyedPartitioner
from minichat.settings import Settings


class Gateway:
    """One producer (acks=all, like a gateway that must not lose a message) for one deployment."""

    def __init__(self, settings: Settings, *, linger_ms: int) -> None:
        self.names = TopicNames(settings.topic_prefix)
        self.producer = AIOKafkaProducer(
            **kafka_client_options(settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=256 * 1024,
            partitioner=KeyedPartitioner(),
        )
        self.records = 0
        """Records acknowledged by the broker."""

    async def __aenter__(self) -> Gateway:
        await self.producer.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.producer.stop()

    async def request(self, chat: Chat, turn: Turn) -> int:
        """Produce the turn's command; returns its record timestamp (LogAppendTime, ms)."""
        pending = await self.producer.send(
            self.names.full(turn.request.topic), value=turn.request.value, key=str(chat.chat_id).encode()
        )
        meta = await pending
        self.records += 1
        return int(meta.timestamp)

    async def facts(self, chat: Chat, turn: Turn) -> None:
        """Produce the turn's provider and usage events (in order) and wait until all are acked."""
        key = str(chat.chat_id).encode()
        pending = [
            await self.producer.send(self.names.full(r.topic), value=r.value, key=key) for r in turn.facts
        ]
        await asyncio.gather(*pending)
        self.records += len(pending)
