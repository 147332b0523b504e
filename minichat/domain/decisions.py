"""A command's `turn.decision`, built once as its fields and encoded once (pure).

`TurnDecision` (models.events) is the decision's wire model; building and validating it for every
command, then dumping it for the table and again for the record, cost a worker ~20 µs a command.
The fields are built here in the model's order and encoded once by pydantic-core; a unit test
(test_output_encodings.py) validates generated decisions with the model and compares the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic_core import to_json

from minichat.domain.admission import Admission, MutationResult
from minichat.domain.ids import turn_id_for
from minichat.models.events import TurnDelete, TurnEdit, TurnRequested, TurnRequestEvent, TurnRetry


def new_request_id(event: TurnRequestEvent) -> UUID:
    """The request a turn-creating command starts (a retry's or edit's new one)."""
    if isinstance(event, TurnRetry | TurnEdit):
        return event.new_request_id
    assert isinstance(event, TurnRequested)
    return event.request_id


def admission_decision(event: TurnRequestEvent, outcome: Admission, at: datetime) -> dict[str, Any]:
    """The `turn.decision` of a turn-creating command, as `decision_fields`."""
    request_id = new_request_id(event)
    return decision_fields(
        event,
        request_id,
        outcome.decision,
        at,
        turn_id=turn_id_for(event.chat_id, request_id) if outcome.accepted else None,
        effective_model=outcome.effective_model,
        selected_model=outcome.selected_model,
        max_output_tokens=outcome.max_output_tokens,
        reserve_tokens=outcome.reserve_tokens,
        reserved_credits_micro=outcome.reserved_credits_micro,
        policy_version=outcome.policy_version,
        downgrade_from=outcome.downgrade_from,
        downgrade_reason=outcome.downgrade_reason,
        error_code=outcome.error_code,
        quota_scope=outcome.quota_scope,
    )


def mutation_decision(event: TurnRequestEvent, outcome: MutationResult, at: datetime) -> dict[str, Any]:
    """The `turn.decision` of a `turn.delete` / `chat.delete`, as `decision_fields`."""
    request_id = event.request_id if isinstance(event, TurnDelete) else None
    return decision_fields(event, request_id, outcome.decision, at, error_code=outcome.error_code)


def decision_fields(
    event: TurnRequestEvent,
    request_id: UUID | None,
    decision: str,
    at: datetime,
    *,
    turn_id: UUID | None = None,
    effective_model: str | None = None,
    selected_model: str | None = None,
    max_output_tokens: int | None = None,
    reserve_tokens: int | None = None,
    reserved_credits_micro: int | None = None,
    policy_version: int | None = None,
    downgrade_from: str | None = None,
    downgrade_reason: str | None = None,
    error_code: str | None = None,
    quota_scope: str | None = None,
) -> dict[str, Any]:
    """Every field of `TurnDecision`, in its order, built once without the model: the rules of
    docs/contract.md, "`turn.decision`" hold by construction (a unit test validates generated
    decisions with the model and compares the encodings)."""
    return {
        "type": "turn.decision",
        "schema_version": 1,
        "tenant_id": event.tenant_id,
        "chat_id": event.chat_id,
        "request_id": request_id,
        "command": event.type,
        "command_event_id": event.event_id,
        "decision": decision,
        "turn_id": turn_id,
        "effective_model": effective_model,
        "selected_model": selected_model,
        "max_output_tokens": max_output_tokens,
        "reserve_tokens": reserve_tokens,
        "reserved_credits_micro": reserved_credits_micro,
        "policy_version": policy_version,
        "downgrade_from": downgrade_from,
        "downgrade_reason": downgrade_reason,
        "error_code": error_code,
        "quota_scope": quota_scope,
        "replay": False,
        "decided_at": at,
    }


def decision_encoding(fields: Mapping[str, Any]) -> tuple[str, bytes]:
    """A new decision's JSON, encoded once by pydantic-core: the text `turn_decisions` stores (what
    `TurnDecision.model_dump_json` gives) and the record value (what `json.dumps` of the decision's
    JSON form gives: the same bytes unless a string holds non-ASCII, which it escapes)."""
    value = to_json(fields)
    text = value.decode()
    if not value.isascii():
        value = json.dumps(json.loads(value), separators=(",", ":")).encode()
    return text, value
