"""Decisions for the commands on `turn-requests` (docs/contract.md, "Admission" and
"Retry, edit and delete").

Each function is pure: (command, state of its chat and user, policy, event time) → decision. The
caller loads the state for a whole batch, applies commands in order, and after an accepted reserve
updates its in-memory copy (`quota.apply_reserve`, running turn, latest turn) before the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple
from uuid import UUID

from minichat.domain.estimation import estimate_input
from minichat.domain.periods import Periods, periods_for
from minichat.domain.quota import (
    BucketKey,
    DowngradeReason,
    QuotaRow,
    QuotaScope,
    TierChoice,
    bucket_keys,
    choose_tier,
    tool_quota_scope,
)
from minichat.models.bounds import MAX_TOKENS
from minichat.models.events import DecisionErrorCode, TurnState
from minichat.models.policy import Policy


@dataclass(frozen=True, slots=True)
class ChatFacts:
    """The stored chat, whatever its tenant or owner (rule 1 compares them)."""

    tenant_id: UUID
    owner_user_id: UUID
    model: str
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """What the rules read of a stored (or just started) turn: the one a retry/edit/delete names
    (live or soft-deleted), a chat's latest live one, or its latest settled ones."""

    request_id: UUID
    requester_user_id: UUID | None
    state: TurnState
    deleted: bool = False
    content: str = ""
    """Its user message; a retry sends it again."""
    image_count: int = 0
    web_search: bool = False
    code_interpreter: bool = False
    settled_tokens: int | None = None
    """in+out of a settled turn (0 when its usage was unknown); None while not settled."""


@dataclass(frozen=True, slots=True)
class ChatState:
    """What a command's decision depends on. Fields a command does not use keep their defaults."""

    chat: ChatFacts | None = None
    already_decided: bool = False
    """A decision is stored for (chat_id, this command's id)."""
    turn_running: bool = False
    """A live turn of the chat is `running` (turn.requested only)."""
    previous_turn_tokens: int = 0
    """in+out usage tokens of the chat's latest live settled turn (0 if none or usage unknown); for
    retry/edit, the latest one other than the turn being replaced."""
    quota: Mapping[BucketKey, QuotaRow] = field(default_factory=dict)
    """The user's rows for the event time's daily and monthly periods (missing = zeros)."""
    target_turn: StoredTurn | None = None
    """retry/edit/delete: the turn with the command's `request_id` in this chat."""
    latest_live_request_id: UUID | None = None
    """retry/edit/delete: `request_id` of the chat's latest live (not soft-deleted) turn."""
    recorded: RecordedOutcome | None = None
    """A rebuild's recorded decision of this command: the quota outcome is taken from it."""


@dataclass(frozen=True, slots=True)
class RecordedOutcome:
    """What `turn-decisions` says a turn-creating command got, as far as quota decided it.

    In a rebuild the quota rows a decision read (shared by the user's chats on every partition)
    can hold other values than they did live, so rules 6-7 are not re-run: the recorded tier,
    model and reserve are applied as they were (docs/contract.md, "Commands": `minichat replay`)."""

    decision: Literal["allow", "downgrade", "reject"]
    policy_version: int
    error_code: DecisionErrorCode | None = None
    quota_scope: QuotaScope | None = None
    effective_model: str | None = None
    downgrade_from: str | None = None
    downgrade_reason: DowngradeReason | None = None
    max_output_tokens: int | None = None
    reserve_tokens: int | None = None
    reserved_credits_micro: int | None = None


@dataclass(frozen=True, slots=True)
class TurnAsk:
    """The fields of `turn.requested` the decision needs."""

    tenant_id: UUID
    user_id: UUID
    content: str
    model: str | None = None
    image_count: int = 0
    web_search: bool = False
    code_interpreter: bool = False


@dataclass(frozen=True, slots=True)
class Regenerate:
    """`turn.retry` (content None: the old turn's content) or `turn.edit` (the new content)."""

    tenant_id: UUID
    user_id: UUID
    request_id: UUID
    content: str | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """The command was decided before: re-send the stored decision with `replay: true`, change nothing."""


REPLAY = Replay()


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision on a turn-creating command and, when accepted, everything the writer stores."""

    decision: Literal["allow", "downgrade", "reject"]
    policy_version: int
    periods: Periods
    selected_model: str | None
    error_code: DecisionErrorCode | None = None
    quota_scope: QuotaScope | None = None
    effective_model: str | None = None
    downgrade_from: str | None = None
    downgrade_reason: DowngradeReason | None = None
    estimated_input_tokens: int | None = None
    max_output_tokens: int | None = None
    """`max_output_tokens_applied` of the effective model."""
    reserve_tokens: int | None = None
    reserved_credits_micro: int | None = None
    minimal_generation_floor_applied: int | None = None
    content: str | None = None
    """The new turn's user message."""
    image_count: int = 0
    web_search: bool = False
    code_interpreter: bool = False
    """The tool flags of the new turn (code interpreter dropped when its kill switch is on)."""
    reserve_deltas: tuple[tuple[BucketKey, int], ...] = ()
    """`reserved_credits_micro += amount` per row: 2 rows (standard) or 4 (premium)."""

    @property
    def accepted(self) -> bool:
        return self.decision != "reject"


@dataclass(frozen=True, slots=True)
class MutationResult:
    """The decision on `turn.delete` / `chat.delete`: `done`, or a reject with its code."""

    decision: Literal["done", "reject"]
    error_code: DecisionErrorCode | None = None


DONE = MutationResult("done")


def _foreign(chat: ChatFacts | None, tenant_id: UUID, user_id: UUID) -> bool:
    """Another tenant's or owner's chat. It is checked before anything else; the caller's own
    deleted chat is checked after a duplicate is recognised, so that every copy of a command gets
    the one decision it was given (the stored key is the caller's own: replaying reveals nothing)."""
    return chat is not None and (chat.tenant_id != tenant_id or chat.owner_user_id != user_id)


def decide_request(
    ask: TurnAsk, state: ChatState, policy: Policy, event_time: datetime
) -> Admission | Replay:
    """`turn.requested`: admission rules 1-8 in the contract's order."""
    periods = periods_for(event_time)
    selected = state.chat.model if state.chat is not None else ask.model

    def reject(code: DecisionErrorCode) -> Admission:
        return Admission("reject", policy.version, periods, selected, error_code=code)

    if _foreign(state.chat, ask.tenant_id, ask.user_id):
        # Echo only what the caller sent: nothing may reveal the hidden chat.
        return Admission("reject", policy.version, periods, ask.model, error_code="chat_not_found")
    if state.already_decided:
        return REPLAY
    if state.chat is not None and state.chat.deleted:
        return Admission("reject", policy.version, periods, ask.model, error_code="chat_not_found")
    if state.turn_running:
        return reject("generation_in_progress")
    if not selected:
        return reject("model_required")
    inputs = _Inputs(ask.content, ask.image_count, ask.web_search, ask.code_interpreter)
    return _decide_quota(policy, periods, state, ask.tenant_id, selected, inputs)


def decide_regenerate(
    cmd: Regenerate, state: ChatState, policy: Policy, event_time: datetime
) -> Admission | Replay:
    """`turn.retry` / `turn.edit`: the mutation checks, then the same quota decision as a request
    (rules 4-8) with the old turn's image count and tool flags."""
    periods = periods_for(event_time)
    chat = state.chat
    if chat is None or _foreign(chat, cmd.tenant_id, cmd.user_id):
        return Admission("reject", policy.version, periods, None, error_code="chat_not_found")
    if state.already_decided:
        return REPLAY
    if chat.deleted:
        return Admission("reject", policy.version, periods, None, error_code="chat_not_found")
    old = _mutation_target(state, cmd.request_id, cmd.user_id)
    if isinstance(old, str):
        return Admission("reject", policy.version, periods, chat.model, error_code=old)
    content = old.content if cmd.content is None else cmd.content
    inputs = _Inputs(content, old.image_count, old.web_search, old.code_interpreter)
    return _decide_quota(policy, periods, state, cmd.tenant_id, chat.model, inputs)


def decide_turn_delete(
    tenant_id: UUID, user_id: UUID, request_id: UUID, state: ChatState
) -> MutationResult | Replay:
    """`turn.delete`: soft-delete the latest live turn when it is terminal and the caller's."""
    if state.chat is None or _foreign(state.chat, tenant_id, user_id):
        return MutationResult("reject", "chat_not_found")
    if state.already_decided:
        return REPLAY
    if state.chat.deleted:
        return MutationResult("reject", "chat_not_found")
    target = _mutation_target(state, request_id, user_id)
    return MutationResult("reject", target) if isinstance(target, str) else DONE


def decide_chat_delete(tenant_id: UUID, user_id: UUID, state: ChatState) -> MutationResult | Replay:
    """`chat.delete`. A duplicate is replayed even though its own effect now hides the chat."""
    chat = state.chat
    if chat is None or chat.tenant_id != tenant_id or chat.owner_user_id != user_id:
        return MutationResult("reject", "chat_not_found")
    if state.already_decided:
        return REPLAY
    return MutationResult("reject", "chat_not_found") if chat.deleted else DONE


def _mutation_target(state: ChatState, request_id: UUID, user_id: UUID) -> StoredTurn | DecisionErrorCode:
    """The turn a retry/edit/delete may act on, or why not, in the specification's order (M2 in
    docs/behaviours.md): turn_not_found, forbidden, invalid_turn_state, not_latest_turn."""
    turn = state.target_turn
    if turn is None:
        return "turn_not_found"
    if turn.requester_user_id != user_id:
        return "forbidden"
    if turn.state == "running":
        return "invalid_turn_state"
    if turn.deleted or state.latest_live_request_id != request_id:
        return "not_latest_turn"
    return turn


def _decide_quota(
    policy: Policy, periods: Periods, state: ChatState, tenant_id: UUID, selected_model: str, inputs: _Inputs
) -> Admission:
    """Admission rules 4-8."""

    def reject(code: DecisionErrorCode, scope: QuotaScope | None = None) -> Admission:
        return Admission(
            "reject", policy.version, periods, selected_model, error_code=code, quota_scope=scope
        )

    refused = _refused_inputs(policy, image_count=inputs.image_count, web_search=inputs.web_search)
    if refused is not None:
        return reject(refused)
    # Code interpreter under its kill switch is dropped, not refused (docs/rules.md; K4 in
    # docs/behaviours.md).
    code_interpreter = inputs.code_interpreter and not policy.kill_switches.disable_code_interpreter
    inputs = inputs._replace(code_interpreter=code_interpreter)
    estimate = estimate_input(
        policy.estimation,
        content_bytes=len(inputs.content.encode("utf-8")),
        image_count=inputs.image_count,
        web_search=inputs.web_search,
        code_interpreter=code_interpreter,
        previous_turn_tokens=state.previous_turn_tokens,
    )
    selected = policy.model_by_id(selected_model)
    if selected is not None and estimate.text_tokens > selected.max_input_tokens:
        return reject("input_too_long")
    if estimate.input_tokens > MAX_TOKENS:
        return reject("input_too_long")  # beyond the arithmetic bound: no reserve can be priced
    if state.recorded is not None:
        return _as_recorded(state.recorded, policy, periods, selected_model, estimate.input_tokens, inputs)
    choice = choose_tier(
        policy, selected_model, policy.limits_for(tenant_id), state.quota, periods, estimate.input_tokens
    )
    if choice.model is None or choice.reserve is None:
        return reject("quota_exceeded", "tokens")
    scope = tool_quota_scope(
        policy, state.quota, periods, web_search=inputs.web_search, code_interpreter=code_interpreter
    )
    if scope is not None:
        return reject("quota_exceeded", scope)
    return _admitted(policy, periods, selected_model, choice, estimate.input_tokens, inputs)


class _Inputs(NamedTuple):
    """The request's own facts an admission carries to the turn it starts."""

    content: str
    image_count: int
    web_search: bool
    code_interpreter: bool


def _refused_inputs(policy: Policy, *, image_count: int, web_search: bool) -> DecisionErrorCode | None:
    """Rule 4: what the policy's limits and kill switches refuse outright."""
    switches = policy.kill_switches
    if image_count > policy.max_images:
        return "too_many_images"
    if image_count > 0 and switches.disable_images:
        return "images_disabled"
    if web_search and switches.disable_web_search:
        return "web_search_disabled"
    return None


def _admitted(
    policy: Policy,
    periods: Periods,
    selected_model: str,
    choice: TierChoice,
    estimated_input_tokens: int,
    inputs: _Inputs,
) -> Admission:
    """The allow or downgrade of a request the quota admits (rules 6-8)."""
    effective, reserve = choice.model, choice.reserve
    assert effective is not None and reserve is not None
    downgraded = effective.id != selected_model or choice.reason is not None
    return Admission(
        "downgrade" if downgraded else "allow",
        policy.version,
        periods,
        selected_model,
        effective_model=effective.id,
        downgrade_from=selected_model if downgraded else None,
        downgrade_reason=(choice.reason or "premium_quota_exhausted") if downgraded else None,
        estimated_input_tokens=estimated_input_tokens,
        max_output_tokens=reserve.max_output_tokens,
        reserve_tokens=reserve.reserve_tokens,
        reserved_credits_micro=reserve.credits_micro,
        minimal_generation_floor_applied=policy.estimation.minimal_generation_floor,
        content=inputs.content,
        image_count=inputs.image_count,
        web_search=inputs.web_search,
        code_interpreter=inputs.code_interpreter,
        reserve_deltas=tuple((key, reserve.credits_micro) for key in bucket_keys(periods, effective.tier)),
    )


def _as_recorded(
    recorded: RecordedOutcome,
    policy: Policy,
    periods: Periods,
    selected_model: str,
    estimated_input_tokens: int,
    inputs: _Inputs,
) -> Admission:
    """The quota outcome a command got live, with the request's own facts (rules 1-5 were re-run)."""
    if recorded.decision == "reject":
        return Admission(
            "reject",
            recorded.policy_version,
            periods,
            selected_model,
            error_code=recorded.error_code,
            quota_scope=recorded.quota_scope,
        )
    model = policy.model_by_id(recorded.effective_model or "")
    tier = model.tier if model is not None else "standard"
    credits = recorded.reserved_credits_micro or 0
    return Admission(
        recorded.decision,
        recorded.policy_version,
        periods,
        selected_model,
        effective_model=recorded.effective_model,
        downgrade_from=recorded.downgrade_from,
        downgrade_reason=recorded.downgrade_reason,
        estimated_input_tokens=estimated_input_tokens,
        max_output_tokens=recorded.max_output_tokens,
        reserve_tokens=recorded.reserve_tokens,
        reserved_credits_micro=credits,
        minimal_generation_floor_applied=policy.estimation.minimal_generation_floor,
        content=inputs.content,
        image_count=inputs.image_count,
        web_search=inputs.web_search,
        code_interpreter=inputs.code_interpreter,
        reserve_deltas=tuple((key, credits) for key in bucket_keys(periods, tier)),
    )
