"""`GatewayClient`: commands produced and answered with their decision, facts produced and
acknowledged by the broker."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr

from minichat.client.decisions import DecisionReader
from minichat.client.messages import Command, Fact, Id, as_uuid, envelope
from minichat.kafka_security import KafkaSecurity
from minichat.models import events
from minichat.models.events import After, TurnDecision, Usage
from minichat.models.topics import TopicNames
from minichat.partitioning import KeyedPartitioner


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


class MissingTopicError(RuntimeError):
    """A topic the client needs does not exist: `minichat topics create` (or the prefix is wrong)."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic} does not exist: run `minichat topics create` (or check the prefix)")
        self.topic = topic


TOKEN_CHATS_MAX = 100_000
"""Chats whose causal token a client remembers (the least recently used are forgotten: their next
command then carries no token, and is ordered by time alone)."""
TOKEN_COMMANDS = (events.TurnRequested, events.TurnRetry, events.TurnEdit)
TERMINAL_FACTS = (events.TurnCompleted, events.TurnFailed, events.TurnCancelled)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


async def _stop(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a client whatever state it is in. While a broker of the cluster is down, aiokafka's
    fetcher cancels the fetch waiting to retry it and awaits it: that CancelledError is not a
    cancellation of ours (re-raised only when this task is being cancelled)."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # a client that failed to stop cleanly is still done with
        pass


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
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | SecretStr | None = None,
        ssl_cafile: str | Path | None = None,
        ssl_certfile: str | Path | None = None,
        ssl_keyfile: str | Path | None = None,
    ) -> None:
        """The security arguments are the processor's `MINICHAT_KAFKA_*` settings of the same
        names (docs/gateway-guide.md); incomplete ones raise `ValueError` here."""
        self.topics = TopicNames(topic_prefix)
        self._security = KafkaSecurity(
            protocol=security_protocol,
            sasl_mechanism=sasl_mechanism,
            sasl_username=sasl_username,
            sasl_password=SecretStr(sasl_password) if isinstance(sasl_password, str) else sasl_password,
            ssl_cafile=_path(ssl_cafile),
            ssl_certfile=_path(ssl_certfile),
            ssl_keyfile=_path(ssl_keyfile),
        )
        self.decision_timeout_s = decision_timeout_s
        self._bootstrap = bootstrap_servers
        self._client_id = client_id
        self._linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._decisions: DecisionReader | None = None
        self._tokens: OrderedDict[uuid.UUID, dict[str, int]] = OrderedDict()
        """Per chat: the acknowledged offsets of the last terminal and usage events produced."""

    async def __aenter__(self) -> Self:
        """Start the producer and the decision reader. When any start fails (a broker away, a
        missing topic), what was started is stopped again before the error propagates."""
        try:
            await self._start()
        except BaseException:
            await self._close()
            raise
        return self

    async def _start(self) -> None:
        security = self._security.client_options()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            **security,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=self._linger_ms,
            partitioner=KeyedPartitioner(),
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            **security,
            client_id=f"{self._client_id}-decisions",
            group_id=None,
            enable_auto_commit=False,
            # short: after an assignment change the new fetch waits on the connection behind the
            # cancelled one's long-poll
            fetch_max_wait_ms=10,
        )
        self._offsets = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            **security,
            client_id=f"{self._client_id}-offsets",
            group_id=None,
        )
        await self._producer.start()
        await self._consumer.start()
        await self._offsets.start()
        # All topics' metadata first: the producer alone would wait out its metadata timeout (40 s)
        # for a topic that does not exist.
        if self.topics.turn_decisions not in await self._offsets.topics():
            raise MissingTopicError(self.topics.turn_decisions)
        partitions = await self._producer.partitions_for(self.topics.turn_decisions)
        self._decisions = DecisionReader(
            self._consumer, self._offsets, self.topics.turn_decisions, len(partitions)
        )
        self._decisions.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        decisions, self._decisions = self._decisions, None
        if decisions is not None:
            await decisions.stop()
        clients = (self._offsets, self._consumer, self._producer)
        self._offsets = self._consumer = self._producer = None
        for client in clients:
            if client is not None:  # stopping a client that never started is harmless
                await _stop(client)

    # ------------------------------------------------------------------------------- commands

    async def send_command(self, command: Command, *, timeout_s: float | None = None) -> TurnDecision:
        """Produce a command and return its decision (`replay: true` when it was decided before).
        A `turn.requested`, `turn.retry` or `turn.edit` without `after` gets the chat's causal
        token: the offsets of the last terminal and usage events this client produced for it."""
        decisions = self._require_decisions()
        command = self.with_token(command)
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
        tenant_id: Id,
        chat_id: Id,
        user_id: Id,
        request_id: Id,
        content: str,
        model: str | None = None,
        title: str | None = None,
        web_search: bool = False,
        code_interpreter: bool = False,
        image_count: int = 0,
        after: After | None = None,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        """A user's message. `model` is required for a new chat and ignored afterwards; `after`
        (default: the chat's causal token, `send_command`)."""
        command = events.TurnRequested(
            **envelope(tenant_id, chat_id),
            user_id=as_uuid("user_id", user_id),
            request_id=as_uuid("request_id", request_id),
            content=content,
            model=model,
            title=title,
            web_search=web_search,
            code_interpreter=code_interpreter,
            image_count=image_count,
            after=after,
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def retry_turn(
        self,
        *,
        tenant_id: Id,
        chat_id: Id,
        user_id: Id,
        request_id: Id,
        new_request_id: Id,
        after: After | None = None,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        """Regenerate the chat's latest turn `request_id` as a new turn `new_request_id`."""
        command = events.TurnRetry(
            **envelope(tenant_id, chat_id),
            user_id=as_uuid("user_id", user_id),
            request_id=as_uuid("request_id", request_id),
            new_request_id=as_uuid("new_request_id", new_request_id),
            after=after,
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def edit_turn(
        self,
        *,
        tenant_id: Id,
        chat_id: Id,
        user_id: Id,
        request_id: Id,
        new_request_id: Id,
        content: str,
        after: After | None = None,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        """Replace the latest turn's message with `content`, as a new turn `new_request_id`."""
        command = events.TurnEdit(
            **envelope(tenant_id, chat_id),
            user_id=as_uuid("user_id", user_id),
            request_id=as_uuid("request_id", request_id),
            new_request_id=as_uuid("new_request_id", new_request_id),
            content=content,
            after=after,
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def delete_turn(
        self,
        *,
        tenant_id: Id,
        chat_id: Id,
        user_id: Id,
        request_id: Id,
        timeout_s: float | None = None,
    ) -> TurnDecision:
        command = events.TurnDelete(
            **envelope(tenant_id, chat_id),
            user_id=as_uuid("user_id", user_id),
            request_id=as_uuid("request_id", request_id),
        )
        return await self.send_command(command, timeout_s=timeout_s)

    async def delete_chat(
        self, *, tenant_id: Id, chat_id: Id, user_id: Id, timeout_s: float | None = None
    ) -> TurnDecision:
        command = events.ChatDelete(**envelope(tenant_id, chat_id), user_id=as_uuid("user_id", user_id))
        return await self.send_command(command, timeout_s=timeout_s)

    # ---------------------------------------------------------------------------------- facts

    async def send_fact(self, fact: Fact) -> None:
        """Produce a provider or usage fact; returns once the broker acknowledged it."""
        topic = (
            self.topics.usage if isinstance(fact, events.UsageReported) else self.topics.provider_responses
        )
        self._remember(fact, await self._produce(topic, fact))

    async def progress(self, *, tenant_id: Id, chat_id: Id, request_id: Id) -> None:
        await self.send_fact(
            events.TurnProgress(**envelope(tenant_id, chat_id), request_id=as_uuid("request_id", request_id))
        )

    async def completed(
        self,
        *,
        tenant_id: Id,
        chat_id: Id,
        request_id: Id,
        content: str,
        usage: Usage | None = None,
        provider_response_id: str | None = None,
        finish_reason: str = "stop",
    ) -> None:
        await self.send_fact(
            events.TurnCompleted(
                **envelope(tenant_id, chat_id),
                request_id=as_uuid("request_id", request_id),
                content=content,
                usage=usage,
                provider_response_id=provider_response_id,
                finish_reason=finish_reason,  # type: ignore[arg-type]  # validated by the model
            )
        )

    async def failed(
        self,
        *,
        tenant_id: Id,
        chat_id: Id,
        request_id: Id,
        error_code: str,
        error_detail: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        await self.send_fact(
            events.TurnFailed(
                **envelope(tenant_id, chat_id),
                request_id=as_uuid("request_id", request_id),
                error_code=error_code,
                error_detail=error_detail,
                usage=usage,
            )
        )

    async def cancelled(
        self,
        *,
        tenant_id: Id,
        chat_id: Id,
        request_id: Id,
        content: str = "",
        usage: Usage | None = None,
    ) -> None:
        await self.send_fact(
            events.TurnCancelled(
                **envelope(tenant_id, chat_id),
                request_id=as_uuid("request_id", request_id),
                content=content,
                usage=usage,
            )
        )

    async def usage(self, *, tenant_id: Id, chat_id: Id, request_id: Id, usage: Usage) -> None:
        """The provider's usage of a turn, when it comes after the terminal event."""
        await self.send_fact(
            events.UsageReported(
                **envelope(tenant_id, chat_id),
                request_id=as_uuid("request_id", request_id),
                **usage.model_dump(exclude_none=True),
            )
        )

    # ---------------------------------------------------------------------------- causal tokens

    def token(self, chat_id: Id) -> After | None:
        """The causal token this client would put on the chat's next command (None: none)."""
        offsets = self._tokens.get(as_uuid("chat_id", chat_id))
        return None if offsets is None else After.model_validate(offsets)

    def with_token(self, command: Command) -> Command:
        """`command` with the chat's causal token, when it may carry one and names none itself."""
        if not isinstance(command, TOKEN_COMMANDS) or command.after is not None:
            return command
        token = self.token(command.chat_id)
        return command if token is None else command.model_copy(update={"after": token})

    def _remember(self, fact: Fact, offset: int) -> None:
        key = "usage" if isinstance(fact, events.UsageReported) else "provider-responses"
        if key == "provider-responses" and not isinstance(fact, TERMINAL_FACTS):
            return  # progress: a later command need not wait for it
        offsets = self._tokens.pop(fact.chat_id, {})
        offsets[key] = max(offset, offsets.get(key, offset))
        self._tokens[fact.chat_id] = offsets
        while len(self._tokens) > TOKEN_CHATS_MAX:
            self._tokens.popitem(last=False)

    # ---------------------------------------------------------------------------------- inside

    def decision_partitions(self) -> Iterable[int]:
        """The `turn-decisions` partitions this instance reads now (for tests and monitoring)."""
        return sorted(tp.partition for tp in self._require_decisions().assigned)

    @property
    def most_partitions_read(self) -> int:
        """The most `turn-decisions` partitions this instance read at once."""
        return self._require_decisions().peak

    def _require_decisions(self) -> DecisionReader:
        if self._decisions is None:
            raise RuntimeError("use GatewayClient as `async with GatewayClient(...) as client`")
        return self._decisions

    async def _produce(self, topic: str, event: Command | Fact) -> int:
        """Produce and wait for the acknowledgement; returns the record's offset."""
        if self._producer is None:
            raise RuntimeError("use GatewayClient as `async with GatewayClient(...) as client`")
        metadata = await self._producer.send_and_wait(
            topic, events.to_json_bytes(event), key=str(event.chat_id).encode()
        )
        offset: int = metadata.offset
        return offset
