"""A micro-batch of `turn-requests` commands, decided in order in memory (pure).

Storage loads a `BatchState` for the batch, `decide_batch` folds the commands over it with the
admission rules and returns the decisions and the row changes; storage writes the changes with
set-based statements. Each command sees the effects of the ones before it (a chat created, a
reserve taken, a turn started), so two requests of one user in one batch see each other.

When a command needs state the snapshot does not hold (after a `turn.delete` the chat's new
latest turn is unknown), the fold stops before it; the caller writes what was decided, loads
again in the same transaction and continues with the rest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from uuid import UUID

from minichat.domain.admission import (
    REPLAY,
    Admission,
    ChatFacts,
    ChatState,
    MutationResult,
    RecordedOutcome,
    Regenerate,
    StoredTurn,
    TurnAsk,
    decide_chat_delete,
    decide_regenerate,
    decide_request,
    decide_turn_delete,
)
from minichat.domain.decisions import admission_decision, decision_encoding, mutation_decision, new_request_id
from minichat.domain.ids import message_id_for, turn_id_for
from minichat.domain.periods import periods_for
from minichat.domain.quota import BucketKey, QuotaRow, apply_reserve
from minichat.models.events import (
    ChatDelete,
    TurnDelete,
    TurnEdit,
    TurnRequested,
    TurnRequestEvent,
    TurnRetry,
)
from minichat.models.policy import Policy

UserKey = tuple[UUID, UUID]
"""(tenant_id, user_id): whose quota rows."""


def command_id_of(event: TurnRequestEvent) -> UUID:
    """The key of the stored decision (docs/contract.md, "Storage")."""
    if isinstance(event, TurnRequested):
        return event.request_id
    if isinstance(event, TurnRetry | TurnEdit):
        return event.new_request_id
    return event.event_id


# ---------------------------------------------------------------------------------------- state


@dataclass(slots=True)
class ChatView:
    """One chat id as the batch sees it, whatever tenant owns it."""

    facts: ChatFacts | None = None
    running: bool = False
    latest_live: StoredTurn | None = None
    settled: list[StoredTurn] = field(default_factory=list)
    """The chat's latest live settled turns, newest first (two are enough for a retry)."""
    targets: dict[UUID, StoredTurn] = field(default_factory=dict)
    """Turns named by the batch's retry/edit/delete commands, by request_id."""
    stale: bool = False
    """The snapshot no longer knows the latest turn: reload before the next command of this chat."""


@dataclass(slots=True)
class BatchState:
    chats: dict[UUID, ChatView]
    decisions: dict[tuple[UUID, UUID], Mapping[str, Any] | bytes]
    """(chat_id, command_id) → stored decision payload of the command's own tenant (JSON form), or
    the JSON of the decision this batch made for it."""
    quota: dict[UserKey, dict[BucketKey, QuotaRow]]
    foreign_decisions: set[tuple[UUID, UUID]] = field(default_factory=set)
    """(chat_id, command_id) keys whose stored decision belongs to another tenant."""
    parked_requests: set[tuple[UUID, UUID]] = field(default_factory=set)
    """(chat_id, request_id) of the batch's new turns that have provider or usage events parked."""
    recorded: dict[tuple[UUID, UUID], RecordedOutcome] = field(default_factory=dict)
    """(chat_id, command_id) → the decision `turn-decisions` recorded (a rebuild only)."""


# -------------------------------------------------------------------------------------- changes


@dataclass(frozen=True, slots=True)
class NewChat:
    id: UUID
    tenant_id: UUID
    user_id: UUID
    model: str
    title: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewTurn:
    id: UUID
    tenant_id: UUID
    chat_id: UUID
    request_id: UUID
    requester_type: str
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
    web_search_enabled: bool
    code_interpreter_enabled: bool
    image_count: int
    started_at: datetime
    user_message_id: UUID
    content: str


@dataclass(frozen=True, slots=True)
class TurnRemoval:
    """Soft delete of a turn and its messages (replaced by a retry/edit, or deleted)."""

    tenant_id: UUID
    chat_id: UUID
    request_id: UUID
    replaced_by_request_id: UUID | None
    at: datetime


@dataclass(frozen=True, slots=True)
class ChatRemoval:
    tenant_id: UUID
    chat_id: UUID
    at: datetime


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """A `turn_decisions` row: its key, the columns storage indexes, and the decision's JSON."""

    tenant_id: UUID
    chat_id: UUID
    command_id: UUID
    command: str
    command_event_id: UUID
    request_id: UUID | None
    decision: str
    error_code: str | None
    decided_at: datetime
    payload: str
    """The decision's JSON text (`TurnDecision.model_dump_json`, `replay` false)."""


@dataclass(slots=True)
class Changes:
    chats: list[NewChat] = field(default_factory=list)
    turns: list[NewTurn] = field(default_factory=list)
    removed_turns: list[TurnRemoval] = field(default_factory=list)
    removed_chats: list[ChatRemoval] = field(default_factory=list)
    reserves: dict[tuple[UUID, UUID, BucketKey], tuple[int, datetime]] = field(default_factory=dict)
    """(tenant, user, row) → (credits to add to reserved, latest event time)."""
    decisions: list[StoredDecision] = field(default_factory=list)

    def add_reserve(self, user: UserKey, key: BucketKey, amount: int, at: datetime) -> None:
        slot = (user[0], user[1], key)
        total, latest = self.reserves.get(slot, (0, at))
        self.reserves[slot] = (total + amount, max(latest, at))


@dataclass(frozen=True, slots=True)
class Answer:
    """The decision to produce for one command; `replay` re-sends a stored one."""

    value: bytes
    """The record value: the decision's JSON, encoded once."""
    replay: bool
    fields: Mapping[str, Any]
    """Its fields: a new decision's as built (UUIDs, datetimes), a replay's as stored (JSON form)."""

    @property
    def payload(self) -> dict[str, Any]:
        """The decision in JSON form, as a consumer reads it."""
        loaded: dict[str, Any] = json.loads(self.value)
        return loaded


@dataclass(slots=True)
class BatchResult:
    answers: list[Answer]
    changes: Changes
    consumed: int
    """How many commands were decided; the rest need a fresh load (see the module docstring)."""


Command = tuple[TurnRequestEvent, datetime]
"""A decoded command and its event time (the record timestamp)."""


# ----------------------------------------------------------------------------------------- fold


def decide_batch(
    state: BatchState,
    commands: Sequence[Command],
    policy: Policy,
    versions: Mapping[int, Policy] | None = None,
) -> BatchResult:
    """`policy` decides; in a rebuild (`versions`: every known policy version), a command with a
    recorded decision is decided wholly under its recorded version: rules, tier, floor and price."""
    changes = Changes()
    answers: list[Answer] = []
    chats, versions = state.chats, versions or {}
    for index, (event, at) in enumerate(commands):
        view = chats.get(event.chat_id)
        if view is None:
            view = chats[event.chat_id] = ChatView()
        elif view.stale:
            return BatchResult(answers, changes, index)
        answers.append(_decide_one(state, view, event, at, policy, changes, versions))
    return BatchResult(answers, changes, len(commands))


def _policy_for(chat_state: ChatState, policy: Policy, versions: Mapping[int, Policy]) -> Policy:
    recorded = chat_state.recorded
    if recorded is None or recorded.policy_version == policy.version:
        return policy
    found = versions.get(recorded.policy_version)
    if found is None:
        raise LookupError(f"policy version {recorded.policy_version} of a recorded decision is not known")
    return found


def _chat_state(
    state: BatchState, view: ChatView, event: TurnRequestEvent, key: tuple[UUID, UUID]
) -> ChatState:
    """`key`: (chat_id, command id)."""
    user: UserKey = (event.tenant_id, event.user_id)
    target = None
    previous = view.settled
    if isinstance(event, TurnRetry | TurnEdit | TurnDelete):
        target = view.targets.get(event.request_id)
        previous = [t for t in view.settled if t.request_id != event.request_id]
    return ChatState(
        chat=view.facts,
        already_decided=key in state.decisions,
        turn_running=view.running,
        previous_turn_tokens=(previous[0].settled_tokens or 0) if previous else 0,
        quota=state.quota.get(user, {}),
        target_turn=target,
        latest_live_request_id=view.latest_live.request_id if view.latest_live else None,
        recorded=state.recorded.get(key) if state.recorded else None,
    )


def _decide_one(
    state: BatchState,
    view: ChatView,
    event: TurnRequestEvent,
    at: datetime,
    policy: Policy,
    changes: Changes,
    versions: Mapping[int, Policy],
) -> Answer:
    command_id = command_id_of(event)
    key = (event.chat_id, command_id)
    chat_state = _chat_state(state, view, event, key)
    policy = _policy_for(chat_state, policy, versions)
    outcome: Admission | MutationResult | object
    if isinstance(event, TurnRequested):
        outcome = decide_request(
            TurnAsk(
                tenant_id=event.tenant_id,
                user_id=event.user_id,
                content=event.content,
                model=event.model,
                image_count=event.image_count,
                web_search=event.web_search,
                code_interpreter=event.code_interpreter,
            ),
            chat_state,
            policy,
            at,
        )
    elif isinstance(event, TurnRetry | TurnEdit):
        content = event.content if isinstance(event, TurnEdit) else None
        outcome = decide_regenerate(
            Regenerate(event.tenant_id, event.user_id, event.request_id, content), chat_state, policy, at
        )
    elif isinstance(event, TurnDelete):
        outcome = decide_turn_delete(event.tenant_id, event.user_id, event.request_id, chat_state)
    else:
        outcome = decide_chat_delete(event.tenant_id, event.user_id, chat_state)

    if state.foreign_decisions and key in state.foreign_decisions:
        # Another tenant holds this command key: treated as a hidden chat, nothing stored.
        outcome = _hidden(event, policy, at)
    if outcome is REPLAY:
        return _replay(state.decisions[key])
    if isinstance(outcome, Admission):
        fields = admission_decision(event, outcome, at)
        if outcome.accepted:
            _start_turn(state, view, event, outcome, at, changes)
    else:
        assert isinstance(outcome, MutationResult)
        fields = mutation_decision(event, outcome, at)
        if outcome.decision == "done":
            _apply_mutation(view, event, at, changes)
    text, value = decision_encoding(fields)
    if not _is_hidden(view, event, fields["error_code"]):
        # (Someone else's chat: answer, but store nothing under a key its owner may use.)
        _store(state, changes, event, key, fields, text)
    return Answer(value, False, fields)


def _replay(stored: Mapping[str, Any] | bytes) -> Answer:
    """A stored decision sent again with `replay: true` (its stored JSON form, keys as stored)."""
    payload = json.loads(stored) if isinstance(stored, bytes) else stored
    fields = {**payload, "replay": True}
    return Answer(json.dumps(fields, separators=(",", ":")).encode(), True, payload)


def _hidden(event: TurnRequestEvent, policy: Policy, at: datetime) -> Admission | MutationResult:
    if isinstance(event, TurnRequested | TurnRetry | TurnEdit):
        return Admission(
            "reject",
            policy.version,
            periods_for(at),
            event.model if isinstance(event, TurnRequested) else None,
            error_code="chat_not_found",
        )
    return MutationResult("reject", "chat_not_found")


def _is_hidden(view: ChatView, event: TurnRequestEvent, error_code: str | None) -> bool:
    """A `chat_not_found` for a chat that exists under another tenant or owner."""
    facts = view.facts
    return (
        error_code == "chat_not_found"
        and facts is not None
        and (facts.tenant_id != event.tenant_id or facts.owner_user_id != event.user_id)
    )


def _store(
    state: BatchState,
    changes: Changes,
    event: TurnRequestEvent,
    key: tuple[UUID, UUID],
    fields: Mapping[str, Any],
    text: str,
) -> None:
    """`key`: (chat_id, command id)."""
    if key not in state.decisions:  # a decision is final: the first one stays stored
        state.decisions[key] = text.encode()
        stored = StoredDecision(
            event.tenant_id, event.chat_id, key[1], fields["command"], fields["command_event_id"],
            fields["request_id"], fields["decision"], fields["error_code"], fields["decided_at"], text,
        )  # fmt: skip
        changes.decisions.append(stored)


def _start_turn(
    state: BatchState,
    view: ChatView,
    event: TurnRequestEvent,
    outcome: Admission,
    at: datetime,
    changes: Changes,
) -> None:
    assert isinstance(event, TurnRequested | TurnRetry | TurnEdit)
    assert outcome.selected_model and outcome.content is not None
    request_id = new_request_id(event)
    if view.facts is None:
        assert isinstance(event, TurnRequested)
        changes.chats.append(
            NewChat(event.chat_id, event.tenant_id, event.user_id, outcome.selected_model, event.title, at)
        )
        view.facts = ChatFacts(event.tenant_id, event.user_id, outcome.selected_model)
    if isinstance(event, TurnRetry | TurnEdit):
        _remove_turn(view, event.tenant_id, event.chat_id, event.request_id, request_id, at, changes)
    changes.turns.append(_new_turn(event, outcome, request_id, at))
    user: UserKey = (event.tenant_id, event.user_id)
    state.quota[user] = apply_reserve(state.quota.get(user, {}), outcome.reserve_deltas)
    for key, amount in outcome.reserve_deltas:
        changes.add_reserve(user, key, amount, at)
    started = StoredTurn(
        request_id, event.user_id, "running", False, outcome.content, outcome.image_count,
        outcome.web_search, outcome.code_interpreter,
    )  # fmt: skip
    view.running = True
    view.latest_live = started
    view.targets[request_id] = started
    if state.parked_requests and (event.chat_id, request_id) in state.parked_requests:
        # Its parked events are applied once this round is written (they may finish the turn):
        # the chat's next command must see the turn as they leave it, so reload first.
        view.stale = True


def _new_turn(event: TurnRequestEvent, outcome: Admission, request_id: UUID, at: datetime) -> NewTurn:
    """The row of an admitted turn (`running`), with its user message's id."""
    assert outcome.effective_model and outcome.selected_model and outcome.content is not None
    assert outcome.reserve_tokens is not None and outcome.max_output_tokens is not None
    assert outcome.reserved_credits_micro is not None and outcome.minimal_generation_floor_applied is not None
    return NewTurn(
        id=turn_id_for(event.chat_id, request_id),
        tenant_id=event.tenant_id,
        chat_id=event.chat_id,
        request_id=request_id,
        requester_type=event.requester_type if isinstance(event, TurnRequested) else "user",
        requester_user_id=event.user_id,
        selected_model=outcome.selected_model,
        effective_model=outcome.effective_model,
        reserve_tokens=outcome.reserve_tokens,
        max_output_tokens_applied=outcome.max_output_tokens,
        reserved_credits_micro=outcome.reserved_credits_micro,
        policy_version_applied=outcome.policy_version,
        minimal_generation_floor_applied=outcome.minimal_generation_floor_applied,
        period_daily=outcome.periods.daily,
        period_monthly=outcome.periods.monthly,
        web_search_enabled=outcome.web_search,
        code_interpreter_enabled=outcome.code_interpreter,
        image_count=outcome.image_count,
        started_at=at,
        user_message_id=message_id_for(event.chat_id, request_id, "user"),
        content=outcome.content,
    )


def _apply_mutation(view: ChatView, event: TurnRequestEvent, at: datetime, changes: Changes) -> None:
    if isinstance(event, TurnDelete):
        _remove_turn(view, event.tenant_id, event.chat_id, event.request_id, None, at, changes)
        # The chat's new latest turn is not in the snapshot.
        view.stale = True
    else:
        assert isinstance(event, ChatDelete) and view.facts is not None
        changes.removed_chats.append(ChatRemoval(event.tenant_id, event.chat_id, at))
        view.facts = dataclasses.replace(view.facts, deleted=True)


def _remove_turn(
    view: ChatView,
    tenant_id: UUID,
    chat_id: UUID,
    request_id: UUID,
    replaced_by: UUID | None,
    at: datetime,
    changes: Changes,
) -> None:
    changes.removed_turns.append(TurnRemoval(tenant_id, chat_id, request_id, replaced_by, at))
    old = view.targets.get(request_id)
    if old is not None:
        view.targets[request_id] = dataclasses.replace(old, deleted=True)
    view.settled = [t for t in view.settled if t.request_id != request_id]
    if view.latest_live is not None and view.latest_live.request_id == request_id:
        view.latest_live = None
