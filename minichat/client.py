"""The gateway's side of minichat: commands in, decisions back, provider facts out.

```python
async with GatewayClient("kafka:9092", topic_prefix="minichat.") as client:
    decision = await client.request_turn(
        tenant_id=tenant, chat_id=chat, user_id=user, request_id=request, content="Hello", model="gpt-5-mini"
    )
    if decision.decision in ("allow", "downgrade"):
        ...  # call decision.effective_model with at most decision.max_output_tokens
        await client.completed(tenant_id=tenant, chat_id=chat, request_id=request, content=answer,
                               usage=Usage(input_tokens=12, output_tokens=80))
```

Every record is keyed by `chat_id` (Kafka's default murmur2 partitioner places it), produced
idempotently with `acks=all`; a call returns once the broker acknowledged it. A command's call
then waits for its `turn.decision`. To find it, the client reads only the `turn-decisions`
partitions of the chats it has commands in flight for (the processor keys decisions by chat too),
from the end offset taken before the command was sent: a gateway instance never reads the
decisions of every chat, however many instances there are.

A repeated command (same ids) is answered with the stored decision, `replay: true`: retrying a
call after a timeout is always safe. `DecisionTimeout` means no decision arrived in time, not that
none will: the command is in the log and will be decided; look it up later with the read API
(`GET /v1/chats/{chat_id}/turns/{request_id}`) or by sending the same command again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from minichat.models import events
from minichat.models.events import TurnDecision, Usage
from minichat.models.topics import TopicNames
from minichat.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Command = events.TurnRequested | events.TurnRetry | events.TurnEdit | events.TurnDelete | events.ChatDelete
Fact = (
    events.TurnProgress
    | events.TurnCompleted
    | events.TurnFailed
    | events.TurnCancelled
    | events.UsageReported
)

FACT_TYPES = (
    events.TurnProgress,
    events.TurnCompleted,
    events.TurnFailed,
    events.TurnCancelled,
    events.UsageReported,
)


class DecisionTimeout(TimeoutError):
    """No decision within the timeout. The command was acknowledged by the broker, so it will be
    decided: send the same command again (answered `replay: true` if it was decided meanwhile), or
    read the turn with the read API."""

    def __init__(self, command: Command, timeout_s: float) -> None:
        request = getattr(command, "new_request_id", None) or getattr(command, "request_id", None)
        where = f"GET /v1/chats/{command.chat_id}/turns/{request}" if request else "the read API"
        super().__init__(
            f"no decision for {command.type} (event {command.event_id}) within {timeout_s:g} s; it is in "
            f"the log and will be decided: send it again with the same ids, or read {where}"
        )
        self.command = command


IDLE_S = 2.0
"""How long a decision partition with nothing in flight stays read."""


def partition_of(chat_id: uuid.UUID, partitions: int) -> int:
    """Where Kafka's default partitioner puts a record keyed by this chat (murmur2, positive)."""
    hashed: int = murmur2(str(chat_id).encode())
    return (hashed & 0x7FFFFFFF) % partitions


def envelope(tenant_id: uuid.UUID, chat_id: uuid.UUID) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "schema_version": 1,
        "occurred_at": datetime.now(UTC),
        "tenant_id": tenant_id,
        "chat_id": chat_id,
    }


class _Decisions:
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


class GatewayClient:
    """An async context manager: `async with GatewayClient(...) as client`."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic_prefix: str = "minichat.",
        *,
        decision_timeout_s: float = 30.0,
        client_id: str = "minichat-gateway",
        linger_ms: int = 0,
    ) -> None:
        self.topics = TopicNames(topic_prefix)
        self.decision_timeout_s = decision_timeout_s
        self._bootstrap = bootstrap_servers
        self._client_id = client_id
        self._linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._decisions: _Decisions | None = None

    async def __aenter__(self) -> Self:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=self._linger_ms,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-decisions",
            group_id=None,
            enable_auto_commit=False,
            # short: after an assignment change the new fetch waits on the connection behind the
            # cancelled one's long-poll
            fetch_max_wait_ms=10,
        )
        self._offsets = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, client_id=f"{self._client_id}-offsets", group_id=None
        )
        await self._producer.start()
        await self._consumer.start()
        await self._offsets.start()
        partitions = await self._producer.partitions_for(self.topics.turn_decisions)
        if not partitions:
            raise RuntimeError(
                f"topic {self.topics.turn_decisions} does not exist: run `minichat topics create`"
            )
        self._decisions = _Decisions(
            self._consumer, self._offsets, self.topics.turn_decisions, len(partitions)
        )
        self._decisions.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._decisions is not None:
            await self._decisions.stop()
        for client in (self._offsets, self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    # ------------------------------------------------------------------------------- commands

    async def send_command(self, command: Command, *, timeout_s: float | None = None) -> TurnDecision:
        """Produce a command and return its decision (`replay: true` when it was decided before)."""
        decisions = self._require_decisions()
        future = await decisions.expect(command)
        try:
            await self._produce(self.topics.turn_requests, command)
            wait = self.decision_timeout_s if timeout_s is None else timeout_s
            try:
                return await asyncio.wait_for(asyncio.shield(future), wait)
            except TimeoutError:
                raise DecisionTimeout(command, wait) from None
        finally:
            future.cancel()
            await decisions.release(command)

    async def request_turn(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        user_id: uuid.UUID,
        request_id: uuid.UUID,
        content: str,
        model: str | None = None,
        title: str | None = None,
        web_search: bool = False,
        code_interpreter: bool = False,
        image_count: int = 0,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        """A user's message. `model` is required for a new chat and ignored afterwards."""
        command = events.TurnRequested(
            **envelope(tenant_id, chat_id),
            user_id=user_id,
            request_id=request_id,
            content=content,
            model=model,
            title=title,
            web_search=web_search,
            code_interpreter=code_interpreter,
            image_count=image_count,
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def retry_turn(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        user_id: uuid.UUID,
        request_id: uuid.UUID,
        new_request_id: uuid.UUID,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        """Regenerate the chat's latest turn `request_id` as a new turn `new_request_id`."""
        command = events.TurnRetry(
            **envelope(tenant_id, chat_id),
            user_id=user_id,
            request_id=request_id,
            new_request_id=new_request_id,
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def edit_turn(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        user_id: uuid.UUID,
        request_id: uuid.UUID,
        new_request_id: uuid.UUID,
        content: str,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        """Replace the latest turn's message with `content`, as a new turn `new_request_id`."""
        command = events.TurnEdit(
            **envelope(tenant_id, chat_id),
            user_id=user_id,
            request_id=request_id,
            new_request_id=new_request_id,
            content=content,
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def delete_turn(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        user_id: uuid.UUID,
        request_id: uuid.UUID,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        command = events.TurnDelete(**envelope(tenant_id, chat_id), user_id=user_id, request_id=request_id)
        return await self.send_command(command, timeout_s=timeout_s)

    async def delete_chat(
        self, *, tenant_id: uuid.UUID, chat_id: uuid.UUID, user_id: uuid.UUID, timeout_s: float | None = None
    ) -> TurnDecision:
        command = events.ChatDelete(**envelope(tenant_id, chat_id), user_id=user_id)
        return await self.send_command(command, timeout_s=timeout_s)

    # ---------------------------------------------------------------------------------- facts

    async def send_fact(self, fact: Fact) -> None:
        """Produce a provider or usage fact; returns once the broker acknowledged it."""
        topic = (
            self.topics.usage if isinstance(fact, events.UsageReported) else self.topics.provider_responses
        )
        await self._produce(topic, fact)

    async def progress(self, *, tenant_id: uuid.UUID, chat_id: uuid.UUID, request_id: uuid.UUID) -> None:
        await self.send_fact(events.TurnProgress(**envelope(tenant_id, chat_id), request_id=request_id))

    async def completed(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        request_id: uuid.UUID,
        content: str,
        usage: Usage | None = None,
        provider_response_id: str | None = None,
        finish_reason: str = "stop",
    ) -> None:
        await self.send_fact(
            events.TurnCompleted(
                **envelope(tenant_id, chat_id),
                request_id=request_id,
                content=content,
                usage=usage,
                provider_response_id=provider_response_id,
                finish_reason=finish_reason,  # type: ignore[arg-type]  # validated by the model
            )
        )

    async def failed(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        request_id: uuid.UUID,
        error_code: str,
        error_detail: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        await self.send_fact(
            events.TurnFailed(
                **envelope(tenant_id, chat_id),
                request_id=request_id,
                error_code=error_code,
                error_detail=error_detail,
                usage=usage,
            )
        )

    async def cancelled(
        self,
        *,
        tenant_id: uuid.UUID,
        chat_id: uuid.UUID,
        request_id: uuid.UUID,
        content: str = "",
        usage: Usage | None = None,
    ) -> None:
        await self.send_fact(
            events.TurnCancelled(
                **envelope(tenant_id, chat_id), request_id=request_id, content=content, usage=usage
            )
        )

    async def usage(
        self, *, tenant_id: uuid.UUID, chat_id: uuid.UUID, request_id: uuid.UUID, usage: Usage
    ) -> None:
        """The provider's usage of a turn, when it comes after the terminal event."""
        await self.send_fact(
            events.UsageReported(
                **envelope(tenant_id, chat_id), request_id=request_id, **usage.model_dump(exclude_none=True)
            )
        )

    # ---------------------------------------------------------------------------------- inside

    def decision_partitions(self) -> Iterable[int]:
        """The `turn-decisions` partitions this instance reads now (for tests and monitoring)."""
        return sorted(tp.partition for tp in self._require_decisions().assigned)

    @property
    def most_partitions_read(self) -> int:
        """The most `turn-decisions` partitions this instance read at once."""
        return self._require_decisions().peak

    def _require_decisions(self) -> _Decisions:
        if self._decisions is None:
            raise RuntimeError("use GatewayClient as `async with GatewayClient(...) as client`")
        return self._decisions

    async def _produce(self, topic: str, event: Command | Fact) -> None:
        if self._producer is None:
            raise RuntimeError("use GatewayClient as `async with GatewayClient(...) as client`")
        await self._producer.send_and_wait(
            topic, events.to_json_bytes(event), key=str(event.chat_id).encode()
        )


def decision_json(decision: TurnDecision) -> dict[str, Any]:
    """A decision as the JSON object on the topic (for logs and tests)."""
    loaded: dict[str, Any] = json.loads(decision.model_dump_json())
    return loaded
