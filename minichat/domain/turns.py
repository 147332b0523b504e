"""A turn's life after admission: provider and usage events applied in order (pure).

`apply_event(turn, event, ...)` returns the turn as it is after the event and what else must be
written (the assistant message, a settlement or an adjustment with its billing event). Every rule
is guarded by the turn's own state, so applying an event twice, or a stale one, changes nothing:
the first terminal event wins, the first usage report wins, a turn settles once, progress counts
each record once (by offset), an orphan signal applies only to the progress it saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal
from uuid import UUID

from pydantic_core import to_json

from minichat.domain.ids import message_id_for
from minichat.domain.periods import Periods
from minichat.domain.quota import BucketKey, QuotaDelta
from minichat.domain.settlement import (
    ORPHAN_TIMEOUT,
    Settlement,
    TurnCharge,
    UsageFigures,
    adjustment_deltas,
    awaits_usage,
    reprice,
    settle,
    settlement_deltas,
)
from minichat.models.events import (
    BillingOutcome,
    ProviderEvent,
    SettlementMethod,
    TerminalState,
    TurnCancelled,
    TurnCompleted,
    TurnFailed,
    TurnOrphaned,
    TurnProgress,
    TurnState,
    UsageAdjusted,
    UsageEvent,
    UsageGraceExpired,
    UsageReported,
    UsageSettled,
    dedupe_key,
)
from minichat.models.events import Usage as WireUsage
from minichat.models.policy import Policy

TurnEvent = ProviderEvent | UsageEvent


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """The stored turn, as far as provider and usage events read or change it."""

    id: UUID
    tenant_id: UUID
    chat_id: UUID
    request_id: UUID
    requester_user_id: UUID
    selected_model: str
    effective_model: str
    reserve_tokens: int
    max_output_tokens_applied: int
    reserved_credits_micro: int
    policy_version_applied: int
    minimal_generation_floor_applied: int
    period_daily: date
    period_monthly: date
    state: TurnState
    updated_at: datetime
    progress_seq: int = 0
    progress_offset: int = -1
    last_progress_at: datetime | None = None
    error_code: str | None = None
    error_detail: str | None = None
    finish_reason: str | None = None
    provider_response_id: str | None = None
    assistant_message_id: UUID | None = None
    completed_at: datetime | None = None
    usage: UsageFigures | None = None
    """The first usage report with figures (inline or `usage.reported`); a report of zeros is kept
    until a real one replaces it. None until one arrived."""
    usage_model: str | None = None
    billing_outcome: BillingOutcome | None = None
    settlement_method: SettlementMethod | None = None
    committed_credits_micro: int | None = None
    overshoot_capped: bool | None = None
    settled_at: datetime | None = None
    adjusted_at: datetime | None = None

    def evolve(self, **changes: Any) -> TurnRecord:
        """`dataclasses.replace`, without its per-call field introspection: a turn changes several
        times per event on the hot path. (A name that is not a field raises AttributeError.)"""
        new = _copy_turn(self)
        for name, value in changes.items():
            _set(new, name, value)
        return new

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def terminal_state(self) -> TerminalState:
        """The state of a turn that ended (settlement and re-pricing read only those)."""
        state = self.state
        if state == "running":
            raise ValueError(f"turn {self.id} is still running")
        return state

    @property
    def charge(self) -> TurnCharge:
        return TurnCharge(
            effective_model=self.effective_model,
            reserve_tokens=self.reserve_tokens,
            max_output_tokens_applied=self.max_output_tokens_applied,
            reserved_credits_micro=self.reserved_credits_micro,
            minimal_generation_floor_applied=self.minimal_generation_floor_applied,
            periods=Periods(self.period_daily, self.period_monthly),
        )

    @property
    def settlement(self) -> Settlement | None:
        if self.settled_at is None:
            return None
        assert self.billing_outcome and self.settlement_method and self.committed_credits_micro is not None
        actual = self.settlement_method == "actual" and self.usage is not None
        return Settlement(
            outcome=self.billing_outcome,
            method=self.settlement_method,
            committed_credits_micro=self.committed_credits_micro,
            overshoot_capped=bool(self.overshoot_capped),
            input_tokens=self.usage.input_tokens if actual and self.usage else 0,
            output_tokens=self.usage.output_tokens if actual and self.usage else 0,
            web_search_calls=self.usage.web_search_calls if self.usage else 0,
            code_interpreter_calls=self.usage.code_interpreter_calls if self.usage else 0,
        )


_TURN_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TurnRecord))
_set = object.__setattr__


def _compile_builder(signature: str, read: Callable[[str], str]) -> Callable[..., TurnRecord]:
    """A function that builds a turn field by field in straight-line code, the way `dataclasses`
    writes `__init__` (a loop over the field names cost twice as much; a turn is built several
    times per event). `read` gives each field's expression."""
    name = signature.partition("(")[0]
    lines = [f"def {signature}:", "    new = _new(TurnRecord)"]
    lines += [f"    _set(new, {field!r}, {read(field)})" for field in _TURN_FIELDS]
    lines.append("    return new")
    scope: dict[str, Any] = {"_new": object.__new__, "_set": _set, "TurnRecord": TurnRecord}
    exec("\n".join(lines), scope)  # the source is made of the dataclass's own field names only
    built: Callable[..., TurnRecord] = scope[name]
    return built


_copy_turn = _compile_builder("copy_turn(turn)", lambda field: f"turn.{field}")
turn_from_columns: Callable[[Any, UsageFigures | None], TurnRecord] = _compile_builder(
    "turn_from_columns(row, usage)", lambda field: "usage" if field == "usage" else f"row[{field!r}]"
)
"""A turn from a stored row, whose columns are named as the fields (`row[name]`), and its usage."""


@dataclass(frozen=True, slots=True)
class AssistantMessage:
    id: UUID
    tenant_id: UUID
    chat_id: UUID
    request_id: UUID
    content: str
    model: str
    provider_response_id: str | None
    usage: UsageFigures | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Billing:
    """A settlement (or an adjustment of one) to apply to the quota rows and to publish."""

    kind: Literal["usage.settled", "usage.adjusted"]
    settlement: Settlement
    deltas: tuple[tuple[BucketKey, QuotaDelta], ...]
    previous_committed_credits_micro: int | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """The turn after one event, and what else to write. `changed` is False for a no-op."""

    turn: TurnRecord
    changed: bool
    message: AssistantMessage | None = None
    message_usage: bool = False
    """The stored assistant message gets the token figures that just arrived."""
    billing: Billing | None = None
    progressed: bool = False
    """Refresh the watchdog's processing-clock liveness."""
    awaiting_usage: bool = False
    """Terminal, waiting for usage: start the watchdog's grace clock."""
    dropped: str | None = None
    """Why an event changed nothing (counted in metrics)."""


def _noop(turn: TurnRecord, why: str) -> Step:
    return Step(turn, changed=False, dropped=why)


def domain_usage(usage: WireUsage | UsageReported) -> UsageFigures:
    return UsageFigures(
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_write_input_tokens,
        usage.reasoning_tokens,
        usage.web_search_calls,
        usage.code_interpreter_calls,
    )


def _changed(turn: TurnRecord, own: bool, **changes: Any) -> TurnRecord:
    """The turn with `changes`: the same object changed in place when the caller owns it (a batch's
    working copy: one turn object per batch, not one frozen copy per change), else a copy."""
    if not own:
        return turn.evolve(**changes)
    for name, value in changes.items():
        _set(turn, name, value)
    return turn


def apply_event(
    turn: TurnRecord, event: TurnEvent, at: datetime, offset: int, snapshot: Policy, *, own: bool = False
) -> Step:
    """Apply one provider or usage event at event time `at` (its record timestamp). `offset` is the
    record's offset (used to count progress once); `snapshot` is the policy the turn was admitted
    under. `own`: the caller owns `turn` (nobody else holds it) and lets it be changed in place;
    `Step.turn` is then `turn` itself."""
    if isinstance(event, TurnProgress):
        if not turn.running:
            return _noop(turn, "not_running")
        if offset <= turn.progress_offset:
            return _noop(turn, "progress_seen")
        progressed = _changed(
            turn,
            own,
            progress_seq=turn.progress_seq + 1,
            progress_offset=offset,
            last_progress_at=at,
            updated_at=max(turn.updated_at, at),
        )
        return Step(progressed, changed=True, progressed=True)
    if isinstance(event, TurnOrphaned) and turn.running and event.progress_seq != turn.progress_seq:
        return _noop(turn, "progress_moved_on")
    if isinstance(event, TurnOrphaned | TurnCompleted | TurnFailed | TurnCancelled):
        if not turn.running:
            return _noop(turn, "not_running")
        return _finish(turn, _terminal_of(event), at, snapshot, own)
    if isinstance(event, UsageReported):
        return _usage_reported(turn, domain_usage(event), event.model, at, snapshot, own)
    assert isinstance(event, UsageGraceExpired)
    if turn.running or turn.settled_at is not None:
        return _noop(turn, "not_waiting_for_usage")
    return _settle(_changed(turn, own, updated_at=max(turn.updated_at, at)), at, snapshot, own)


@dataclass(frozen=True, slots=True)
class _Terminal:
    """What a terminal event says, whichever kind it is."""

    state: TerminalState
    content: str | None = None
    """The assistant text to store; None stores no message."""
    provider_response_id: str | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    error_detail: str | None = None
    usage: WireUsage | None = None


def _terminal_of(event: TurnOrphaned | TurnCompleted | TurnFailed | TurnCancelled) -> _Terminal:
    if isinstance(event, TurnCompleted):
        return _Terminal(
            "completed",
            content=event.content,
            provider_response_id=event.provider_response_id,
            finish_reason=event.finish_reason,
            usage=event.usage,
        )
    if isinstance(event, TurnCancelled):  # a cancelled turn keeps its partial text, if any
        return _Terminal("cancelled", content=event.content or None, usage=event.usage)
    if isinstance(event, TurnFailed):
        return _Terminal(
            "failed", error_code=event.error_code, error_detail=event.error_detail, usage=event.usage
        )
    return _Terminal("failed", error_code=ORPHAN_TIMEOUT)


def _reported_model(usage: WireUsage | None) -> str | None:
    return usage.model if usage is not None else None


def _finish(turn: TurnRecord, terminal: _Terminal, at: datetime, snapshot: Policy, own: bool) -> Step:
    inline = domain_usage(terminal.usage) if terminal.usage is not None else None
    first_usage = _first_known(turn.usage, inline)
    message = None
    if terminal.content is not None:
        message = AssistantMessage(
            id=message_id_for(turn.chat_id, turn.request_id, "assistant"),
            tenant_id=turn.tenant_id,
            chat_id=turn.chat_id,
            request_id=turn.request_id,
            content=terminal.content,
            model=turn.effective_model,
            provider_response_id=terminal.provider_response_id,
            usage=first_usage,
            created_at=at,
        )
    finished = _changed(
        turn,
        own,
        state=terminal.state,
        error_code=terminal.error_code,
        error_detail=terminal.error_detail,
        finish_reason=terminal.finish_reason,
        provider_response_id=terminal.provider_response_id,
        assistant_message_id=message.id if message else None,
        completed_at=at,
        updated_at=max(turn.updated_at, at),
        usage=first_usage,
        usage_model=turn.usage_model if first_usage is turn.usage else _reported_model(terminal.usage),
    )
    if awaits_usage(terminal.state, terminal.error_code, first_usage):
        return Step(finished, changed=True, message=message, awaiting_usage=True)
    return _settle(finished, at, snapshot, own, message=message)


def _first_known(stored: UsageFigures | None, arriving: UsageFigures | None) -> UsageFigures | None:
    """The first report wins, but a report of zeros (usage not known) gives way to a real one."""
    if stored is not None and (stored.known or arriving is None or not arriving.known):
        return stored
    return arriving


def _usage_reported(
    turn: TurnRecord, usage: UsageFigures, model: str | None, at: datetime, snapshot: Policy, own: bool
) -> Step:
    if turn.usage is not None and (turn.usage.known or not usage.known):
        return _noop(turn, "usage_already_reported")
    has_message = turn.assistant_message_id is not None
    previous = turn.settlement  # read before the new usage lands (in place, it would read that)
    previous_committed, adjusted_before = turn.committed_credits_micro, turn.adjusted_at
    reported = _changed(turn, own, usage=usage, usage_model=model, updated_at=max(turn.updated_at, at))
    if reported.running or (reported.settled_at is None and not usage.known):
        # A report of zeros is not usage: a waiting turn keeps waiting (for a real report or the
        # grace period), so zeros can neither make a turn free nor block the real figures.
        return Step(reported, changed=True, message_usage=has_message)
    if reported.settled_at is None:
        return _settle(reported, at, snapshot, own, message_usage=has_message)
    assert previous is not None and previous_committed is not None
    charge = reported.charge
    adjusted = reprice(charge, previous, usage, reported.terminal_state, reported.error_code, snapshot)
    if adjusted is None or adjusted_before is not None:
        return Step(reported, changed=True, message_usage=has_message)
    billing = Billing(
        "usage.adjusted",
        adjusted,
        adjustment_deltas(charge, previous, adjusted, snapshot),
        previous_committed_credits_micro=previous_committed,
    )
    repriced = _changed(
        reported,
        own,
        settlement_method=adjusted.method,
        committed_credits_micro=adjusted.committed_credits_micro,
        overshoot_capped=adjusted.overshoot_capped,
        adjusted_at=at,
    )
    return Step(repriced, changed=True, message_usage=has_message, billing=billing)


def _settle(
    turn: TurnRecord,
    at: datetime,
    snapshot: Policy,
    own: bool,
    *,
    message: AssistantMessage | None = None,
    message_usage: bool = False,
) -> Step:
    charge = turn.charge
    settlement = settle(charge, turn.usage, turn.terminal_state, turn.error_code, snapshot)
    billing = Billing("usage.settled", settlement, settlement_deltas(charge, settlement, snapshot))
    settled = _changed(
        turn,
        own,
        billing_outcome=settlement.outcome,
        settlement_method=settlement.method,
        committed_credits_micro=settlement.committed_credits_micro,
        overshoot_capped=settlement.overshoot_capped,
        # The later of the events that made it settle (terminal, usage): the same whichever topic
        # was read first, so a replay settles at the same instant.
        settled_at=max(at, turn.updated_at),
    )
    return Step(settled, changed=True, message=message, message_usage=message_usage, billing=billing)


def billing_fields(turn: TurnRecord, billing: Billing) -> dict[str, Any]:
    """The `usage.settled` / `usage.adjusted` event of a settled turn (docs/contract.md, "Output
    events") as its fields, in the wire model's order: `billing_json` encodes them as the model's
    `model_dump_json` would, `billing_event` validates them (a unit test holds the two together)."""
    assert turn.settled_at is not None
    settlement = billing.settlement
    usage = turn.usage
    adjusted = billing.kind == "usage.adjusted"
    fields: dict[str, Any] = {
        "type": billing.kind,
        "schema_version": 1,
        "dedupe_key": dedupe_key(turn.tenant_id, turn.id, turn.request_id, adjusted),
        "tenant_id": turn.tenant_id,
        "user_id": turn.requester_user_id,
        "chat_id": turn.chat_id,
        "turn_id": turn.id,
        "request_id": turn.request_id,
        "selected_model": turn.selected_model,
        "effective_model": turn.effective_model,
        "terminal_state": turn.terminal_state,
        "billing_outcome": settlement.outcome,
        "settlement_method": settlement.method,
        "error_code": turn.error_code,
        "usage": _usage_fields(usage, turn.usage_model) if usage is not None else None,
        "reserve_tokens": turn.reserve_tokens,
        "reserved_credits_micro": turn.reserved_credits_micro,
        "committed_credits_micro": settlement.committed_credits_micro,
        "overshoot_capped": settlement.overshoot_capped,
        "policy_version_applied": turn.policy_version_applied,
        "web_search_calls": settlement.web_search_calls,
        "code_interpreter_calls": settlement.code_interpreter_calls,
        "period_daily": turn.period_daily,
        "period_monthly": turn.period_monthly,
        "settled_at": turn.adjusted_at if adjusted else turn.settled_at,
    }
    if adjusted:
        assert turn.adjusted_at is not None and billing.previous_committed_credits_micro is not None
        fields["previous_committed_credits_micro"] = billing.previous_committed_credits_micro
    return fields


def _usage_fields(usage: UsageFigures, model: str | None) -> dict[str, Any]:
    """The wire `Usage` of a turn's figures, in its fields' order."""
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_write_input_tokens": usage.cache_write_input_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "web_search_calls": usage.web_search_calls,
        "code_interpreter_calls": usage.code_interpreter_calls,
        "model": model,
    }


def billing_json(fields: dict[str, Any]) -> str:
    """`billing_fields` as the JSON text the wire model's `model_dump_json` gives, encoded once by
    pydantic-core without building and validating the model (the event is built by this code)."""
    return to_json(fields).decode()


def billing_event(turn: TurnRecord, billing: Billing) -> UsageSettled | UsageAdjusted:
    """The billing event as its wire model, validated as the models validate what they receive
    (strict): every contract rule of the event checked."""
    fields = billing_fields(turn, billing)
    if billing.kind == "usage.adjusted":
        return UsageAdjusted.model_validate(fields)
    return UsageSettled.model_validate(fields)
