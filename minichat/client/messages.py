"""What a gateway sends and receives, as the client types it: the commands, the provider and
usage facts, a fresh envelope, and a decision as the JSON object on the topic."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from minichat.models import events
from minichat.models.events import TurnDecision

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


Id = uuid.UUID | str
"""An id as a gateway holds it: a `uuid.UUID` or its text (`"0b6f…"`, with or without braces)."""


def as_uuid(name: str, value: Id) -> uuid.UUID:
    """`value` as a UUID; a string that is none raises `ValueError` naming the argument."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValueError(f"{name} must be a UUID or its text, got {str(value)[:64]!r}")


def envelope(tenant_id: Id, chat_id: Id) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "schema_version": 1,
        "occurred_at": datetime.now(UTC),
        "tenant_id": as_uuid("tenant_id", tenant_id),
        "chat_id": as_uuid("chat_id", chat_id),
    }


def decision_json(decision: TurnDecision) -> dict[str, Any]:
    """A decision as the JSON object on the topic (for logs and tests)."""
    loaded: dict[str, Any] = json.loads(decision.model_dump_json())
    return loaded
