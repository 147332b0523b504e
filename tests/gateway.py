"""A test gateway: builds contract events, produces them, and reads the processor's answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from minichat.models.topics import TopicNames
from minichat.settings import PACKAGED_POLICY, Settings
from tests.support import TopicReader, produce_json

Event = dict[str, Any]


def policy_file(directory: Path, **changes: Any) -> Path:
    """The packaged example policy with top-level keys (or nested dicts) replaced."""
    policy = yaml.safe_load(PACKAGED_POLICY.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    path = directory / f"policy-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _envelope(kind: str, tenant: uuid.UUID, chat: uuid.UUID, **fields: Any) -> Event:
    event: Event = {
        "type": kind,
        "event_id": str(uuid.uuid4()),
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "tenant_id": str(tenant),
        "chat_id": str(chat),
    }
    event.update({k: str(v) if isinstance(v, uuid.UUID) else v for k, v in fields.items()})
    return event


class Gateway:
    """One test's view of a deployment: its own tenants and chats, shared topics and worker."""

    def __init__(self, settings: Settings, decisions: TopicReader) -> None:
        self.settings = settings
        self.topics = TopicNames(settings.topic_prefix)
        self.decisions = decisions

    # -- commands
    def requested(
        self,
        tenant: uuid.UUID,
        user: uuid.UUID,
        chat: uuid.UUID,
        *,
        content: str = "hello",
        model: str | None = "gpt-5-mini",
        request_id: uuid.UUID | None = None,
        **fields: Any,
    ) -> Event:
        extra = {"model": model} if model is not None else {}
        return _envelope(
            "turn.requested",
            tenant,
            chat,
            user_id=user,
            request_id=request_id or uuid.uuid4(),
            content=content,
            **extra,
            **fields,
        )

    def retry(self, tenant: uuid.UUID, user: uuid.UUID, chat: uuid.UUID, request_id: Any) -> Event:
        return _envelope(
            "turn.retry", tenant, chat, user_id=user, request_id=request_id, new_request_id=uuid.uuid4()
        )

    def edit(
        self, tenant: uuid.UUID, user: uuid.UUID, chat: uuid.UUID, request_id: Any, content: str
    ) -> Event:
        return _envelope(
            "turn.edit",
            tenant,
            chat,
            user_id=user,
            request_id=request_id,
            new_request_id=uuid.uuid4(),
            content=content,
        )

    def delete_turn(self, tenant: uuid.UUID, user: uuid.UUID, chat: uuid.UUID, request_id: Any) -> Event:
        return _envelope("turn.delete", tenant, chat, user_id=user, request_id=request_id)

    def delete_chat(self, tenant: uuid.UUID, user: uuid.UUID, chat: uuid.UUID) -> Event:
        return _envelope("chat.delete", tenant, chat, user_id=user)

    # -- provider and usage facts
    def provider(self, kind: str, command: Event, **fields: Any) -> Event:
        return _envelope(
            kind,
            uuid.UUID(command["tenant_id"]),
            uuid.UUID(command["chat_id"]),
            request_id=command.get("new_request_id", command.get("request_id")),
            **fields,
        )

    def usage(self, command: Event, input_tokens: int, output_tokens: int, **fields: Any) -> Event:
        return self.provider(
            "usage.reported", command, input_tokens=input_tokens, output_tokens=output_tokens, **fields
        )

    # -- sending and answers
    async def send(self, *events: Event) -> None:
        await produce_json(self.settings.kafka_bootstrap_servers, self.topics.turn_requests, list(events))

    async def send_provider(self, *events: Event) -> None:
        await produce_json(
            self.settings.kafka_bootstrap_servers, self.topics.provider_responses, list(events)
        )

    async def send_usage(self, *events: Event) -> None:
        await produce_json(self.settings.kafka_bootstrap_servers, self.topics.usage, list(events))

    async def answers(
        self, commands: Iterable[Event], *, copies: int = 1, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """The decisions answering `commands` (in the order given), waiting for `copies` of each."""
        wanted = [c["event_id"] for c in commands]

        def answered(values: list[dict[str, Any]]) -> bool:
            seen: dict[str, int] = {}
            for value in values:
                seen[value["command_event_id"]] = seen.get(value["command_event_id"], 0) + 1
            return all(seen.get(w, 0) >= copies for w in wanted)

        values = await self.decisions.wait_for(answered, timeout=timeout, what=f"decisions for {wanted}")
        by_command: dict[str, list[dict[str, Any]]] = {}
        for value in values:
            by_command.setdefault(value["command_event_id"], []).append(value)
        return [d for w in wanted for d in by_command[w]]

    async def decide(self, *commands: Event, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Send commands and return one decision per command, in order."""
        await self.send(*commands)
        return await self.answers(commands, timeout=timeout)
