"""The client's reader of `turn-decisions`: only the partitions of the chats it has commands in
flight for (the processor keys decisions by chat, as Kafka's default partitioner places them), each
from the end offset taken before the command was sent."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from minichat.client.messages import Command
from minichat.models.events import TurnDecision
from minichat.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

IDLE_S = 2.0
"""How long a decision partition with nothing in flight stays read."""


def partition_of(chat_id: uuid.UUID, partitions: int) -> int:
    """Where Kafka's default partitioner puts a record keyed by this chat (murmur2, positive)."""
    hashed: int = murmur2(str(chat_id).encode())
    return (hashed & 0x7FFFFFFF) % partitions


class DecisionReader:
    """Reads the `turn-decisions` partitions that in-flight commands need, and nothing else."""

    def __init__(
        self, consumer: AIOKafkaConsumer, offsets: AIOKafkaConsumer, topic: str, partitions: int
    ) -> None:
        self._consumer = consumer
        self._offsets = offsets
        self._topic = topic
        self._partitions = partitions
        self._waiting: dict[uuid.UUID, list[asyncio.Future[TurnDecision]]] = {}
        self._by_request: dict[tuple[uuid.UUID, str, uuid.UUID], uuid.UUID] = {}
        self._users: dict[int, int] = {}  # partition -> commands in flight on it
        self._assigned: set[TopicPartition] = set()
        self.peak = 0
        """The most partitions read at once."""
        self._last_used: dict[int, float] = {}
        self._change = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="minichat-client-decisions")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()

    @property
    def assigned(self) -> set[TopicPartition]:
        return set(self._assigned)

    async def expect(self, command: Command) -> asyncio.Future[TurnDecision]:
        """Register a command before it is sent: its partition is read from its end offset now."""
        if self._task is not None and self._task.done():
            self._task.result()  # the reader died: raise its error
        partition = partition_of(command.chat_id, self._partitions)
        future: asyncio.Future[TurnDecision] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(command.event_id, []).append(future)
        request = getattr(command, "new_request_id", None) or getattr(command, "request_id", None)
        if request is not None and command.type in ("turn.requested", "turn.retry", "turn.edit"):
            self._by_request[(command.chat_id, command.type, request)] = command.event_id
        self._users[partition] = self._users.get(partition, 0) + 1
        async with self._change:
            tp = TopicPartition(self._topic, partition)
            if tp not in self._assigned:
                await self._reassign(self._assigned | {tp}, new=tp)
        return future

    async def release(self, command: Command) -> None:
        """The command's wait ended (answered or given up). A partition with no command in flight
        for `IDLE_S` is no longer read (the last one stays assigned: an empty assignment stops
        aiokafka's fetcher for good); the grace keeps a busy instance from re-assigning per call."""
        partition = partition_of(command.chat_id, self._partitions)
        self._users[partition] -= 1
        if not self._users[partition]:
            del self._users[partition]
        futures = self._waiting.get(command.event_id, [])
        if all(f.done() for f in futures):
            self._waiting.pop(command.event_id, None)
            self._by_request = {k: v for k, v in self._by_request.items() if v != command.event_id}
        now = time.monotonic()
        self._last_used[partition] = now
        async with self._change:
            idle = {
                tp
                for tp in self._assigned
                if tp.partition not in self._users and now - self._last_used.get(tp.partition, now) >= IDLE_S
            }
            if idle and len(self._assigned) > 1:
                keep = (self._assigned - idle) or {min(self._assigned, key=lambda t: t.partition)}
                await self._reassign(keep)

    async def _reassign(self, wanted: set[TopicPartition], new: TopicPartition | None = None) -> None:
        """Read `wanted`: the partitions kept read on from their positions, `new` from its end
        offset, resolved before the caller produces (so its decision cannot be missed)."""
        kept = {tp: await self._consumer.position(tp) for tp in self._assigned & wanted}
        self._consumer.assign(sorted(wanted, key=lambda t: t.partition))
        for tp, offset in kept.items():
            self._consumer.seek(tp, offset)
        if new is not None:
            # The end offset from a consumer that never fetches: on the reading consumer's
            # connection the broker would answer it only after the fetch in flight returns.
            end = (await self._offsets.end_offsets([new]))[new]
            self._consumer.seek(new, end)
        self._assigned = set(wanted)
        self.peak = max(self.peak, len(self._assigned))

    async def _run(self) -> None:
        while True:
            if not self._assigned:
                await asyncio.sleep(0.05)  # nothing in flight yet
                continue
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    self._deliver(record.value)

    def _deliver(self, value: bytes | None) -> None:
        try:
            decision = TurnDecision.model_validate_json(value or b"")
        except ValueError:
            logger.warning("a record of turn-decisions is not a decision; ignored")
            return
        event_id = decision.command_event_id
        if event_id not in self._waiting and decision.request_id is not None:
            # a duplicate command under new event ids is answered with the stored decision
            event_id = self._by_request.get(
                (decision.chat_id, decision.command, decision.request_id), event_id
            )
        for future in self._waiting.get(event_id, []):
            if not future.done():
                future.set_result(decision)
                break
