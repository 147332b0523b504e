"""Builders of input events for the pure domain tests (`test_domain_commands`, `test_domain_turns`).

Every event gets a fresh deterministic `event_id` and an `occurred_at` far from any event time used
in the tests, so a test that finds `occurred_at` in an output knows the wrong clock was read.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from minichat.models.events import (
    OUTPUT_ADAPTER,
    ChatDelete,
    OutputEvent,
    TurnCancelled,
    TurnCompleted,
    TurnDelete,
    TurnEdit,
    TurnFailed,
    TurnOrphaned,
    TurnProgress,
    TurnRequested,
    TurnRetry,
    Usage,
    UsageGraceExpired,
    UsageReported,
)

NS = UUID("9adf340e-8e36-5009-a11f-afe188bf1e3a")
"""The contract's id namespace, written out again (never imported from the code under test)."""

TENANT = UUID("7e000000-0000-4000-8000-000000000001")
OTHER_TENANT = UUID("7e000000-0000-4000-8000-000000000002")
USER = UUID("05e40000-0000-4000-8000-000000000001")
OTHER_USER = UUID("05e40000-0000-4000-8000-000000000002")
CHAT = UUID("c4a70000-0000-4000-8000-00000000000a")
CHAT_B = UUID("c4a70000-0000-4000-8000-00000000000b")
CHAT_C = UUID("c4a70000-0000-4000-8000-00000000000c")
R0 = UUID("4e900000-0000-4000-8000-000000000000")
R1 = UUID("4e900000-0000-4000-8000-000000000001")
R2 = UUID("4e900000-0000-4000-8000-000000000002")
R3 = UUID("4e900000-0000-4000-8000-000000000003")

OCCURRED_AT = datetime(1999, 12, 31, 23, 59, tzinfo=UTC)
"""Informational only (docs/contract.md, "Envelope"): nothing may come out of it."""

_event_ids = itertools.count(1)


def event_id() -> UUID:
    return UUID(int=(0xE0E0 << 112) + next(_event_ids))


def _envelope(tenant: UUID, chat: UUID, eid: UUID | None) -> dict[str, Any]:
    return {
        "event_id": eid or event_id(),
        "schema_version": 1,
        "occurred_at": OCCURRED_AT,
        "tenant_id": tenant,
        "chat_id": chat,
    }


# ---------------------------------------------------------------------------------- turn-requests


def requested(
    request_id: UUID = R1,
    *,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    user: UUID = USER,
    content: str = "",
    model: str | None = "std",
    eid: UUID | None = None,
    **extra: Any,
) -> TurnRequested:
    return TurnRequested(
        **_envelope(tenant, chat, eid),
        user_id=user,
        request_id=request_id,
        content=content,
        model=model,
        **extra,
    )


def retry(
    request_id: UUID = R1,
    new_request_id: UUID = R2,
    *,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    user: UUID = USER,
    eid: UUID | None = None,
) -> TurnRetry:
    return TurnRetry(
        **_envelope(tenant, chat, eid), user_id=user, request_id=request_id, new_request_id=new_request_id
    )


def edit(
    request_id: UUID = R1,
    new_request_id: UUID = R2,
    content: str = "edited",
    *,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    user: UUID = USER,
    eid: UUID | None = None,
) -> TurnEdit:
    return TurnEdit(
        **_envelope(tenant, chat, eid),
        user_id=user,
        request_id=request_id,
        new_request_id=new_request_id,
        content=content,
    )


def turn_delete(
    request_id: UUID = R1,
    *,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    user: UUID = USER,
    eid: UUID | None = None,
) -> TurnDelete:
    return TurnDelete(**_envelope(tenant, chat, eid), user_id=user, request_id=request_id)


def chat_delete(
    *, chat: UUID = CHAT, tenant: UUID = TENANT, user: UUID = USER, eid: UUID | None = None
) -> ChatDelete:
    return ChatDelete(**_envelope(tenant, chat, eid), user_id=user)


# ------------------------------------------------------------------ provider-responses and usage


def usage(input_tokens: int, output_tokens: int, **counts: Any) -> Usage:
    """The inline `usage` object of a terminal event."""
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, **counts)


def progress(request_id: UUID = R1, *, chat: UUID = CHAT, tenant: UUID = TENANT) -> TurnProgress:
    return TurnProgress(**_envelope(tenant, chat, None), request_id=request_id)


def completed(
    content: str = "the answer",
    inline: Usage | None = None,
    *,
    request_id: UUID = R1,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    **extra: Any,
) -> TurnCompleted:
    return TurnCompleted(
        **_envelope(tenant, chat, None), request_id=request_id, content=content, usage=inline, **extra
    )


def failed(
    error_code: str,
    inline: Usage | None = None,
    *,
    request_id: UUID = R1,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    error_detail: str | None = None,
) -> TurnFailed:
    return TurnFailed(
        **_envelope(tenant, chat, None),
        request_id=request_id,
        error_code=error_code,
        error_detail=error_detail,
        usage=inline,
    )


def cancelled(
    content: str = "",
    inline: Usage | None = None,
    *,
    request_id: UUID = R1,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
) -> TurnCancelled:
    return TurnCancelled(
        **_envelope(tenant, chat, None), request_id=request_id, content=content, usage=inline
    )


def orphaned(
    progress_seq: int = 0, *, request_id: UUID = R1, chat: UUID = CHAT, tenant: UUID = TENANT
) -> TurnOrphaned:
    return TurnOrphaned(**_envelope(tenant, chat, None), request_id=request_id, progress_seq=progress_seq)


def reported(
    input_tokens: int,
    output_tokens: int,
    *,
    request_id: UUID = R1,
    chat: UUID = CHAT,
    tenant: UUID = TENANT,
    **counts: Any,
) -> UsageReported:
    return UsageReported(
        **_envelope(tenant, chat, None),
        request_id=request_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        **counts,
    )


def grace_expired(request_id: UUID = R1, *, chat: UUID = CHAT, tenant: UUID = TENANT) -> UsageGraceExpired:
    return UsageGraceExpired(**_envelope(tenant, chat, None), request_id=request_id)


# ------------------------------------------------------------------------------------- outputs


def through_the_wire(payload: Mapping[str, Any]) -> OutputEvent:
    """An output payload as a consumer sees it: JSON text, validated by the output models."""
    return OUTPUT_ADAPTER.validate_json(json.dumps(payload))
