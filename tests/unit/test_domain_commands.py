"""`decide_batch`: a micro-batch of turn-requests commands folded over a `BatchState`.

docs/contract.md: "Input events" and "`turn.decision`", "Admission", "Retry, edit and delete",
"Ids", "Storage" (`turn_decisions` keyed by `(chat_id, command id)`). Reference behaviours (test ids
`bNN`): 14, 19, 20, 63, 71, 72, 75-81 and 89 as far as they concern deciding a batch; the pure
per-command rules are in `test_domain_admission.py`.

Catalog (from `test_domain_admission`): `prem` (premium, max output 8192), `std` (standard default,
2048), `std-alt` (standard, 1024), all at 1M/1M, so one token costs one micro-credit. An empty
message estimates to 110 tokens: a `std` turn reserves 2158, a `prem` turn 8302; "hello" (5 bytes)
estimates to 113.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

import pytest

from minichat.domain.admission import ChatFacts, StoredTurn
from minichat.domain.commands import (
    Answer,
    BatchResult,
    BatchState,
    ChatRemoval,
    ChatView,
    NewChat,
    NewTurn,
    TurnRemoval,
    command_id_of,
    decide_batch,
)
from minichat.domain.ids import ID_NAMESPACE, message_id_for, turn_id_for
from minichat.domain.quota import BucketKey, QuotaRow
from minichat.models.events import TurnDecision, TurnRequestEvent, TurnState
from minichat.models.policy import Policy
from tests.unit.builders import (
    CHAT,
    CHAT_B,
    CHAT_C,
    NS,
    OTHER_TENANT,
    OTHER_USER,
    R0,
    R1,
    R2,
    R3,
    TENANT,
    USER,
    chat_delete,
    edit,
    event_id,
    requested,
    retry,
    through_the_wire,
    turn_delete,
)
from tests.unit.test_domain_admission import (
    BIG,
    D_PREM,
    D_TOTAL,
    DAY,
    M_PREM,
    M_TOTAL,
    MONTH,
    NOW,
    POLICY,
    make_policy,
)

STD_RESERVE = 110 + 2048
PREM_RESERVE = 110 + 8192
LATER = NOW + timedelta(seconds=5)


# ---------------------------------------------------------------------------------------- helpers


def stored_turn(
    request_id: UUID,
    state: TurnState = "completed",
    *,
    user: UUID | None = USER,
    content: str = "hello",
    settled_tokens: int | None = None,
    deleted: bool = False,
    image_count: int = 0,
    web_search: bool = False,
    code_interpreter: bool = False,
) -> StoredTurn:
    return StoredTurn(
        request_id=request_id,
        requester_user_id=user,
        state=state,
        deleted=deleted,
        content=content,
        image_count=image_count,
        web_search=web_search,
        code_interpreter=code_interpreter,
        settled_tokens=settled_tokens,
    )


def chat_view(
    *turns: StoredTurn,
    tenant: UUID = TENANT,
    owner: UUID = USER,
    model: str = "std",
    deleted: bool = False,
) -> ChatView:
    """A loaded chat whose turns are given newest first (as storage loads them)."""
    live = [t for t in turns if not t.deleted]
    latest = live[0] if live else None
    return ChatView(
        facts=ChatFacts(tenant, owner, model, deleted),
        running=latest is not None and latest.state == "running",
        latest_live=latest,
        settled=[t for t in live if t.settled_tokens is not None][:2],
        targets={t.request_id: t for t in turns},
    )


def batch_state(
    chats: dict[UUID, ChatView] | None = None,
    decisions: dict[tuple[UUID, UUID], dict[str, Any]] | None = None,
    quota: dict[tuple[UUID, UUID], dict[BucketKey, QuotaRow]] | None = None,
) -> BatchState:
    return BatchState(chats=chats or {}, decisions=decisions or {}, quota=quota or {})


Cmd = TurnRequestEvent | tuple[TurnRequestEvent, datetime]


def run(state: BatchState, *commands: Cmd, policy: Policy = POLICY) -> BatchResult:
    timed = [c if isinstance(c, tuple) else (c, NOW) for c in commands]
    return decide_batch(state, timed, policy)


def decisions(result: BatchResult) -> list[TurnDecision]:
    """Every answer as a consumer reads it, validated by the wire model."""
    out = []
    for answer in result.answers:
        decision = through_the_wire(answer.payload)
        assert isinstance(decision, TurnDecision)
        out.append(decision)
    return out


def outcome(result: BatchResult) -> list[tuple[object, ...]]:
    return [
        (d.decision, d.error_code, d.quota_scope, answer.replay)
        for d, answer in zip(decisions(result), result.answers, strict=True)
    ]


def only_decisions_changed(result: BatchResult) -> bool:
    c = result.changes
    return not (c.chats or c.turns or c.removed_turns or c.removed_chats or c.reserves)


def uuid5_turn(chat: UUID, request: UUID) -> UUID:
    return uuid5(NS, f"turn:{chat}:{request}")


def uuid5_message(chat: UUID, request: UUID, role: str) -> UUID:
    return uuid5(NS, f"message:{chat}:{request}:{role}")


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------- ids


def test_ids_are_the_contract_uuid5() -> None:
    assert UUID("9adf340e-8e36-5009-a11f-afe188bf1e3a") == ID_NAMESPACE == NS
    # Literal values pin the name format (lowercase hyphenated UUIDs, colons, role name).
    assert turn_id_for(CHAT, R1) == UUID("798efbeb-aefc-52a2-a51d-075fba6aab16") == uuid5_turn(CHAT, R1)
    assert message_id_for(CHAT, R1, "user") == UUID("98eea152-5b8d-5427-b8c7-74f65fa4e4c2")
    assert message_id_for(CHAT, R1, "assistant") == UUID("946cc849-905e-5d3b-85dd-8f9f65851fa0")
    assert turn_id_for(CHAT, R1) != turn_id_for(CHAT_B, R1) != turn_id_for(CHAT, R2)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        pytest.param(requested(R1), R1, id="turn.requested-request_id"),
        pytest.param(retry(R1, R2), R2, id="turn.retry-new_request_id"),
        pytest.param(edit(R1, R3), R3, id="turn.edit-new_request_id"),
        pytest.param(turn_delete(R1, eid=UUID(int=77)), UUID(int=77), id="turn.delete-event_id"),
        pytest.param(chat_delete(eid=UUID(int=78)), UUID(int=78), id="chat.delete-event_id"),
    ],
)
def test_command_id_is_the_contract_decision_key(command: TurnRequestEvent, expected: UUID) -> None:
    assert command_id_of(command) == expected


# ------------------------------------------------------------------------------ a new chat, allow


@pytest.mark.parametrize(
    ("model", "max_out", "keys"),
    [
        pytest.param("std", 2048, (D_TOTAL, M_TOTAL), id="b19-b63-standard-two-rows"),
        pytest.param("prem", 8192, (D_PREM, D_TOTAL, M_PREM, M_TOTAL), id="b19-b63-premium-four-rows"),
    ],
)
def test_new_chat_allow_creates_chat_turn_message_reserve_and_decision(
    model: str, max_out: int, keys: tuple[BucketKey, ...]
) -> None:
    eid = event_id()
    command = requested(
        R1, content="hello", model=model, title="Greeting", requester_type="system", image_count=1, eid=eid
    )
    state = batch_state()
    result = run(state, command)
    reserve = 113 + 1000 + max_out  # text + one image + max output
    turn_id = uuid5_turn(CHAT, R1)

    assert result.consumed == 1
    changes = result.changes
    assert changes.chats == [NewChat(CHAT, TENANT, USER, model, "Greeting", NOW)]
    assert changes.turns == [
        NewTurn(
            id=turn_id,
            tenant_id=TENANT,
            chat_id=CHAT,
            request_id=R1,
            requester_type="system",
            requester_user_id=USER,
            selected_model=model,
            effective_model=model,
            reserve_tokens=reserve,
            max_output_tokens_applied=max_out,
            reserved_credits_micro=reserve,
            policy_version_applied=1,
            minimal_generation_floor_applied=50,
            period_daily=DAY,
            period_monthly=MONTH,
            web_search_enabled=False,
            code_interpreter_enabled=False,
            image_count=1,
            started_at=NOW,
            user_message_id=uuid5_message(CHAT, R1, "user"),
            content="hello",
        )
    ]
    assert changes.reserves == {(TENANT, USER, key): (reserve, NOW) for key in keys}
    assert changes.removed_turns == [] and changes.removed_chats == []

    payload = {
        "type": "turn.decision",
        "schema_version": 1,
        "tenant_id": str(TENANT),
        "chat_id": str(CHAT),
        "request_id": str(R1),
        "command": "turn.requested",
        "command_event_id": str(eid),
        "decision": "allow",
        "turn_id": str(turn_id),
        "effective_model": model,
        "selected_model": model,
        "max_output_tokens": max_out,
        "reserve_tokens": reserve,
        "reserved_credits_micro": reserve,
        "policy_version": 1,
        "downgrade_from": None,
        "downgrade_reason": None,
        "error_code": None,
        "quota_scope": None,
        "replay": False,
        "decided_at": iso(NOW),
    }
    [answer] = result.answers
    assert answer.payload == payload and not answer.replay
    assert answer.value == json.dumps(payload, separators=(",", ":")).encode()  # the record value
    [stored] = changes.decisions
    assert (stored.tenant_id, stored.chat_id, stored.command_id) == (TENANT, CHAT, R1)
    assert (stored.command, stored.command_event_id, stored.request_id) == ("turn.requested", eid, R1)
    assert (stored.decision, stored.error_code, stored.decided_at) == ("allow", None, NOW)
    assert json.loads(stored.payload) == payload  # what the table stores
    assert through_the_wire(json.loads(stored.payload)) == through_the_wire(payload)

    # What the next command of the batch sees.
    view = state.chats[CHAT]
    assert (view.facts, view.running, view.stale) == (ChatFacts(TENANT, USER, model), True, False)
    assert view.latest_live is not None and view.latest_live.request_id == R1
    assert state.quota[(TENANT, USER)] == {key: QuotaRow(reserved_credits_micro=reserve) for key in keys}
    stored_json = state.decisions[(CHAT, R1)]
    assert isinstance(stored_json, bytes) and json.loads(stored_json) == payload


def test_downgrade_is_stored_with_its_reason() -> None:
    result = run(batch_state(), requested(model="prem"), policy=make_policy(premium=(0, BIG)))
    [decision] = decisions(result)
    assert (decision.decision, decision.effective_model, decision.selected_model) == (
        "downgrade",
        "std",
        "prem",
    )
    assert (decision.downgrade_from, decision.downgrade_reason) == ("prem", "premium_quota_exhausted")
    [turn] = result.changes.turns
    assert (turn.selected_model, turn.effective_model, turn.reserved_credits_micro) == ("prem", "std", 2158)
    assert result.changes.chats[0].model == "prem"  # the chat keeps the selected model
    assert set(result.changes.reserves) == {(TENANT, USER, D_TOTAL), (TENANT, USER, M_TOTAL)}


@pytest.mark.parametrize(
    ("at", "daily", "monthly"),
    [
        pytest.param(
            datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC), date(2026, 2, 28), date(2026, 2, 1), id="b89"
        ),
        pytest.param(datetime(2026, 3, 1, tzinfo=UTC), date(2026, 3, 1), date(2026, 3, 1), id="b89-next"),
    ],
)
def test_event_time_decides_periods_and_decided_at(at: datetime, daily: date, monthly: date) -> None:
    """docs/contract.md, "Envelope": event time is the record timestamp, never `occurred_at` (1999
    in builders)."""
    result = run(batch_state(), (requested(), at))
    [decision] = decisions(result)
    assert decision.decided_at == at
    [turn] = result.changes.turns
    assert (turn.period_daily, turn.period_monthly, turn.started_at) == (daily, monthly, at)
    assert result.changes.chats[0].created_at == at
    assert {key.period_start for _, _, key in result.changes.reserves} == {daily, monthly}


def test_a_rejected_first_request_creates_no_chat() -> None:
    state = batch_state()
    result = run(state, requested(R1, model=None), requested(R2, model="std"))
    assert outcome(result) == [("reject", "model_required", None, False), ("allow", None, None, False)]
    assert [chat.id for chat in result.changes.chats] == [CHAT]
    assert [turn.request_id for turn in result.changes.turns] == [R2]
    assert len(result.changes.decisions) == 2


# --------------------------------------------------------------------- one user, one batch, quota


@pytest.mark.parametrize(
    ("limit", "expected", "reserved"),
    [
        pytest.param(
            2 * STD_RESERVE - 1,
            [("allow", None, None, False), ("reject", "quota_exceeded", "tokens", False)],
            STD_RESERVE,
            id="limit-fits-one",
        ),
        pytest.param(
            2 * STD_RESERVE,
            [("allow", None, None, False), ("allow", None, None, False)],
            2 * STD_RESERVE,
            id="b20-b28-limit-fits-both-exactly",
        ),
    ],
)
def test_two_requests_of_one_user_on_two_chats_see_each_others_reserve(
    limit: int, expected: list[tuple[object, ...]], reserved: int
) -> None:
    policy = make_policy(standard=(limit, BIG))
    state = batch_state()
    result = run(state, (requested(R1, chat=CHAT), NOW), (requested(R2, chat=CHAT_B), LATER), policy=policy)
    assert outcome(result) == expected
    assert result.changes.reserves[(TENANT, USER, D_TOTAL)][0] == reserved
    assert result.changes.reserves[(TENANT, USER, M_TOTAL)][0] == reserved
    assert state.quota[(TENANT, USER)][D_TOTAL] == QuotaRow(reserved_credits_micro=reserved)
    if reserved == 2 * STD_RESERVE:
        assert result.changes.reserves[(TENANT, USER, D_TOTAL)] == (reserved, LATER)  # latest event time


def test_stored_spending_and_reserves_count_with_the_batch() -> None:
    policy = make_policy(standard=(10_000, BIG))
    rows = {D_TOTAL: QuotaRow(spent_credits_micro=10_000 - 2 * STD_RESERVE, reserved_credits_micro=0)}
    result = run(
        batch_state(quota={(TENANT, USER): rows}),
        requested(R1, chat=CHAT),
        requested(R2, chat=CHAT_B),
        requested(R3, chat=CHAT_C),
        policy=policy,
    )
    assert [d.decision for d in decisions(result)] == ["allow", "allow", "reject"]


def test_another_users_reserve_does_not_count() -> None:
    policy = make_policy(standard=(STD_RESERVE, BIG))
    result = run(
        batch_state(),
        requested(R1, chat=CHAT, user=USER),
        requested(R2, chat=CHAT_B, user=OTHER_USER),
        requested(R3, chat=CHAT_C, tenant=OTHER_TENANT, user=USER),
        policy=policy,
    )
    assert [d.decision for d in decisions(result)] == ["allow", "allow", "allow"]
    assert {(tenant, user) for tenant, user, _ in result.changes.reserves} == {
        (TENANT, USER),
        (TENANT, OTHER_USER),
        (OTHER_TENANT, USER),
    }


# ------------------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize(
    "second",
    [
        pytest.param("same-event", id="b71-same-record-twice"),
        pytest.param("new-event", id="b71-same-request-id-new-event"),
    ],
)
def test_duplicate_request_in_one_batch_is_replayed(second: str) -> None:
    first = requested(R1, model="std")
    again = first if second == "same-event" else requested(R1, model="prem", content="different")
    result = run(batch_state(), first, again)
    assert result.consumed == 2
    assert outcome(result) == [("allow", None, None, False), ("allow", None, None, True)]
    assert result.answers[1].payload == {**result.answers[0].payload, "replay": True}
    assert len(result.changes.turns) == len(result.changes.chats) == len(result.changes.decisions) == 1
    assert result.changes.reserves[(TENANT, USER, D_TOTAL)][0] == STD_RESERVE


@pytest.mark.parametrize(
    ("command", "view"),
    [
        pytest.param(requested(R1), None, id="b71-turn.requested"),
        pytest.param(
            requested(R1),
            chat_view(stored_turn(R1, "running")),
            id="b71-replay-before-generation-in-progress",
        ),
        pytest.param(
            retry(R1, R2), chat_view(stored_turn(R2, "running"), stored_turn(R1, deleted=True)), id="retry"
        ),
        pytest.param(edit(R1, R2), chat_view(stored_turn(R2, "completed")), id="edit"),
        pytest.param(
            turn_delete(R1, eid=UUID(int=9)), chat_view(stored_turn(R1, deleted=True)), id="turn.delete"
        ),
        pytest.param(
            chat_delete(eid=UUID(int=9)), chat_view(deleted=True), id="chat.delete-of-a-deleted-chat"
        ),
    ],
)
def test_duplicate_across_batches_resends_the_stored_decision(
    command: TurnRequestEvent, view: ChatView | None
) -> None:
    stored: dict[str, Any] = {"a": "stored payload", "decision": "reject"}  # returned as is, never rebuilt
    state = batch_state(
        chats={CHAT: view} if view is not None else None,
        decisions={(CHAT, command_id_of(command)): stored},
    )
    result = run(state, command, (command, LATER))
    resent = json.dumps({**stored, "replay": True}, separators=(",", ":")).encode()
    assert result.answers == [Answer(resent, True, stored), Answer(resent, True, stored)]
    assert result.answers[0].fields is stored
    assert only_decisions_changed(result) and result.changes.decisions == []
    assert result.consumed == 2


def test_a_stored_reject_stays_rejected() -> None:
    """docs/contract.md, "Admission", rule 2: a decision is final, even when the request would now
    be accepted."""
    first = run(batch_state(), requested(R1), policy=make_policy(standard=(0, BIG)))
    [payload] = [a.payload for a in first.answers]
    result = run(batch_state(decisions={(CHAT, R1): dict(payload)}), requested(R1))
    assert outcome(result) == [("reject", "quota_exceeded", "tokens", True)]
    assert only_decisions_changed(result) and result.changes.decisions == []


# ------------------------------------------------------------------------------ one running turn


def test_b72_generation_in_progress_within_a_batch() -> None:
    result = run(batch_state(), requested(R1), requested(R2), requested(R3, chat=CHAT_B))
    assert outcome(result) == [
        ("allow", None, None, False),
        ("reject", "generation_in_progress", None, False),
        ("allow", None, None, False),
    ]
    assert [t.request_id for t in result.changes.turns] == [R1, R3]
    assert result.changes.reserves[(TENANT, USER, D_TOTAL)][0] == 2 * STD_RESERVE
    [rejected] = [d for d in decisions(result) if d.decision == "reject"]
    assert (rejected.request_id, rejected.turn_id, rejected.selected_model) == (R2, None, "std")


@pytest.mark.parametrize(
    ("latest", "expected"),
    [
        pytest.param("running", "reject", id="b72-stored-running-turn"),
        pytest.param("completed", "allow", id="b72-after-terminal-a-new-send-succeeds"),
        pytest.param("failed", "allow", id="after-failed"),
    ],
)
def test_stored_running_turn_blocks_new_requests(latest: TurnState, expected: str) -> None:
    state = batch_state(chats={CHAT: chat_view(stored_turn(R1, latest))})
    [decision] = decisions(run(state, requested(R2)))
    assert decision.decision == expected


# -------------------------------------------------------------------------------- hidden chats


HIDDEN: dict[str, dict[str, Any]] = {
    "other-tenant": {"tenant": OTHER_TENANT},
    "other-owner": {"owner": OTHER_USER},
    "deleted": {"deleted": True},
}


def hidden_view(kind: str) -> ChatView:
    """A chat the caller (TENANT, USER) may not see, whose latest turn R1 is the caller's."""
    return chat_view(stored_turn(R1, settled_tokens=1), model="secret", **HIDDEN[kind])


@pytest.mark.parametrize("hidden", list(HIDDEN))
@pytest.mark.parametrize(
    "command",
    [
        pytest.param(requested(R2, model="std"), id="turn.requested"),
        pytest.param(retry(R1, R2), id="turn.retry"),
        pytest.param(edit(R1, R2), id="turn.edit"),
        pytest.param(turn_delete(R1), id="turn.delete"),
        pytest.param(chat_delete(), id="chat.delete"),
    ],
)
def test_hidden_chat_is_not_found_and_nothing_is_stored(hidden: str, command: TurnRequestEvent) -> None:
    """Rule 1: nothing about someone else's chat changes, not even a stored decision under its
    key (the owner may use the same command id); the owner's own deleted chat keeps the decision."""
    result = run(batch_state(chats={CHAT: hidden_view(hidden)}), command)
    [decision] = decisions(result)
    assert (decision.decision, decision.error_code, decision.turn_id) == ("reject", "chat_not_found", None)
    assert (decision.tenant_id, decision.effective_model, decision.reserve_tokens) == (TENANT, None, None)
    assert decision.selected_model in (None, "std")  # only what the caller sent, never "secret"
    assert only_decisions_changed(result)
    stored = [d.command_id for d in result.changes.decisions]
    assert stored == ([command_id_of(command)] if hidden == "deleted" else [])


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(retry(R1, R2, eid=UUID(int=5)), id="turn.retry"),
        pytest.param(edit(R1, R2, eid=UUID(int=5)), id="turn.edit"),
        pytest.param(turn_delete(R1, eid=UUID(int=5)), id="turn.delete"),
        pytest.param(chat_delete(eid=UUID(int=5)), id="chat.delete"),
    ],
)
def test_hidden_chat_answer_equals_the_answer_for_a_chat_that_never_existed(
    command: TurnRequestEvent,
) -> None:
    """Rule 1: "nothing reveals that it exists"."""
    unknown = run(batch_state(), command).answers
    for kind in HIDDEN:
        assert run(batch_state(chats={CHAT: hidden_view(kind)}), command).answers == unknown


def test_a_chat_created_in_the_batch_is_hidden_from_others() -> None:
    result = run(
        batch_state(),
        requested(R1),
        requested(R2, tenant=OTHER_TENANT),
        requested(R3, user=OTHER_USER),
    )
    assert outcome(result) == [
        ("allow", None, None, False),
        ("reject", "chat_not_found", None, False),
        ("reject", "chat_not_found", None, False),
    ]
    assert len(result.changes.turns) == 1


@pytest.mark.parametrize("order", ["intruder-first", "owner-first-then-duplicate"])
def test_another_tenants_command_never_answers_the_owners(order: str) -> None:
    owner = chat_view(stored_turn(R0, "completed", settled_tokens=0))
    intruder = requested(R1, tenant=OTHER_TENANT, user=OTHER_USER)
    mine = requested(R1)
    commands = [intruder, mine] if order == "intruder-first" else [mine, intruder, mine]
    result = run(batch_state(chats={CHAT: owner}), *commands)
    mine_answers = [a for a, c in zip(result.answers, commands, strict=True) if c.tenant_id == TENANT]
    assert all(a.payload["tenant_id"] == str(TENANT) for a in mine_answers)
    assert mine_answers[0].payload["decision"] == "allow"


# ---------------------------------------------------------------------------------- chat.delete


def test_chat_delete_then_request_in_one_batch() -> None:
    state = batch_state(chats={CHAT: chat_view(stored_turn(R1, settled_tokens=10))})
    result = run(state, chat_delete(), (requested(R2), LATER))
    assert outcome(result) == [("done", None, None, False), ("reject", "chat_not_found", None, False)]
    assert result.changes.removed_chats == [ChatRemoval(TENANT, CHAT, NOW)]
    assert result.changes.turns == [] and result.changes.reserves == {}
    assert result.consumed == 2
    done = decisions(result)[0]
    assert (done.request_id, done.turn_id, done.command) == (None, None, "chat.delete")


def test_chat_delete_leaves_a_running_turn_alone() -> None:
    """docs/contract.md, "Retry, edit and delete": its running turn, if any, still finishes and settles."""
    result = run(batch_state(chats={CHAT: chat_view(stored_turn(R1, "running"))}), chat_delete())
    assert outcome(result) == [("done", None, None, False)]
    assert result.changes.removed_turns == []


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        pytest.param(None, "chat_not_found", id="unknown-chat"),
        pytest.param(chat_view(deleted=True), "chat_not_found", id="already-deleted"),
    ],
)
def test_chat_delete_rejected(view: ChatView | None, expected: str) -> None:
    result = run(batch_state(chats={CHAT: view} if view else None), chat_delete())
    assert [d.error_code for d in decisions(result)] == [expected]
    assert only_decisions_changed(result)


def test_second_chat_delete_in_the_batch() -> None:
    first = chat_delete()
    result = run(batch_state(chats={CHAT: chat_view()}), first, chat_delete(), first)
    assert outcome(result) == [
        ("done", None, None, False),
        ("reject", "chat_not_found", None, False),
        ("done", None, None, True),
    ]
    assert len(result.changes.removed_chats) == 1


def test_a_duplicate_after_chat_delete_is_replayed() -> None:
    """Every copy of a command gets the one decision it was given (docs/contract.md, "Topics": re-sent
    on duplicates; "a decision is final"): the caller's own deleted chat is checked after rule 2, so a
    copy of an accepted request redelivered after `chat.delete` re-sends the `allow`. A new
    command on the deleted chat is still chat_not_found."""
    first = requested(R1)
    result = run(batch_state(), first, chat_delete(), first, requested(R2))
    assert outcome(result) == [
        ("allow", None, None, False),
        ("done", None, None, False),
        ("allow", None, None, True),
        ("reject", "chat_not_found", None, False),
    ]
    assert (
        len(result.changes.turns) == 1 and result.changes.reserves[(TENANT, USER, D_TOTAL)][0] == STD_RESERVE
    )


# ------------------------------------------------------------------------------------ retry, edit


def replaceable(*, with_older: bool = True, **latest: Any) -> ChatView:
    """A chat whose latest turn R1 is completed and settled (300 tokens), after R0 (700 tokens)."""
    fields: dict[str, Any] = {"content": "hello", "settled_tokens": 300, **latest}
    turns = [stored_turn(R1, **fields)]
    if with_older:
        turns.append(stored_turn(R0, content="first", settled_tokens=700))
    return chat_view(*turns)


@pytest.mark.parametrize(
    ("command", "content", "text_tokens"),
    [
        pytest.param(retry(R1, R2), "hello", 113, id="b75-b77-retry-resends-the-old-content"),
        pytest.param(
            edit(R1, R2, "edited words"), "edited words", 114, id="b76-b77-edit-sends-the-new-content"
        ),
    ],
)
def test_accepted_regenerate_replaces_the_latest_turn(
    command: TurnRequestEvent, content: str, text_tokens: int
) -> None:
    view = replaceable(image_count=1, web_search=True, code_interpreter=True)
    state = batch_state(chats={CHAT: view})
    result = run(state, command)
    [decision] = decisions(result)
    assert (decision.decision, decision.request_id, decision.command) == ("allow", R2, command.type)
    assert decision.turn_id == uuid5_turn(CHAT, R2)
    assert result.changes.removed_turns == [TurnRemoval(TENANT, CHAT, R1, R2, NOW)]
    assert result.changes.chats == []
    [turn] = result.changes.turns
    # b14: the previous settled turn other than the replaced one (R0, 700 tokens) is added.
    estimate = text_tokens + 1000 + 500 + 1000 + 700  # text, image, web search, code interpreter, R0
    assert (turn.request_id, turn.id, turn.content, turn.user_message_id) == (
        R2,
        uuid5_turn(CHAT, R2),
        content,
        uuid5_message(CHAT, R2, "user"),
    )
    assert (turn.image_count, turn.web_search_enabled, turn.code_interpreter_enabled) == (1, True, True)
    assert (turn.reserve_tokens, turn.reserved_credits_micro) == (estimate + 2048, estimate + 2048)
    assert (turn.selected_model, turn.requester_user_id, turn.requester_type) == ("std", USER, "user")
    assert result.changes.reserves[(TENANT, USER, D_TOTAL)] == (estimate + 2048, NOW)
    # The view now knows the new turn: it is running and the latest one.
    assert view.running and view.latest_live is not None and view.latest_live.request_id == R2
    assert not view.stale and result.consumed == 1


def test_regenerate_without_an_older_settled_turn_adds_no_previous_tokens() -> None:
    result = run(batch_state(chats={CHAT: replaceable(with_older=False)}), retry(R1, R2))
    [turn] = result.changes.turns
    assert turn.reserve_tokens == 113 + 2048  # not + 300: those are the replaced turn's tokens


def test_b14_a_new_request_adds_the_latest_settled_turn() -> None:
    result = run(batch_state(chats={CHAT: replaceable()}), requested(R2))
    [turn] = result.changes.turns
    assert turn.reserve_tokens == 110 + 300 + 2048


def test_after_a_regenerate_the_batch_sees_the_new_running_turn() -> None:
    r4, r5 = UUID(int=4), UUID(int=5)
    result = run(
        batch_state(chats={CHAT: replaceable()}),
        retry(R1, R2),
        requested(R3),
        retry(R1, r4),
        turn_delete(R2),
        edit(R2, r5),
    )
    assert outcome(result) == [
        ("allow", None, None, False),
        ("reject", "generation_in_progress", None, False),
        ("reject", "not_latest_turn", None, False),  # R1 is gone
        ("reject", "invalid_turn_state", None, False),  # R2 is running
        ("reject", "invalid_turn_state", None, False),
    ]
    assert len(result.changes.turns) == 1 and len(result.changes.removed_turns) == 1


@pytest.mark.parametrize("make", [retry, edit, turn_delete], ids=["retry", "edit", "delete"])
@pytest.mark.parametrize(
    ("view", "target", "expected"),
    [
        pytest.param(chat_view(stored_turn(R1, "running")), R1, "invalid_turn_state", id="b78-running"),
        pytest.param(
            chat_view(stored_turn(R2, settled_tokens=1), stored_turn(R1, settled_tokens=1)),
            R1,
            "not_latest_turn",
            id="b80-not-latest",
        ),
        pytest.param(
            chat_view(stored_turn(R1, "cancelled", deleted=True)), R1, "not_latest_turn", id="b81-deleted"
        ),
        pytest.param(chat_view(stored_turn(R1)), R3, "turn_not_found", id="unknown-request"),
        pytest.param(chat_view(stored_turn(R1, user=OTHER_USER)), R1, "forbidden", id="b79-other-requester"),
    ],
)
def test_rejected_mutation_changes_nothing(make: Any, view: ChatView, target: UUID, expected: str) -> None:
    command: TurnRequestEvent = make(target)
    result = run(batch_state(chats={CHAT: view}), command, requested(R3, chat=CHAT_B))
    first = decisions(result)[0]
    assert (first.decision, first.error_code, first.turn_id) == ("reject", expected, None)
    expected_request = target if command.type == "turn.delete" else R2
    assert first.request_id == expected_request
    assert result.changes.removed_turns == [] and [t.chat_id for t in result.changes.turns] == [CHAT_B]
    assert not view.stale and result.consumed == 2


# ---------------------------------------------------------------------------------- turn.delete


def test_b81_turn_delete_removes_the_turn_and_stops_before_that_chats_next_command() -> None:
    view = chat_view(stored_turn(R1, settled_tokens=300), stored_turn(R0, settled_tokens=700))
    commands: Sequence[Cmd] = (
        requested(R2, chat=CHAT_B),
        (turn_delete(R1), LATER),
        requested(R3, chat=CHAT_C),
        requested(R3),  # needs the chat's new latest turn: not decided in this fold
        requested(R1, chat=CHAT_B),
    )
    state = batch_state(chats={CHAT: view})
    result = run(state, *commands)
    assert result.consumed == 3
    assert outcome(result) == [
        ("allow", None, None, False),
        ("done", None, None, False),
        ("allow", None, None, False),
    ]
    done = decisions(result)[1]
    assert (done.command, done.request_id, done.turn_id, done.decided_at) == ("turn.delete", R1, None, LATER)
    assert result.changes.removed_turns == [TurnRemoval(TENANT, CHAT, R1, None, LATER)]
    assert view.stale

    # The caller writes, loads again and continues with the rest.
    reloaded = batch_state(
        chats={
            CHAT: chat_view(stored_turn(R0, settled_tokens=700), stored_turn(R1, deleted=True)),
            CHAT_B: chat_view(stored_turn(R2, "running")),
            CHAT_C: chat_view(stored_turn(R3, "running")),
        },
        decisions=dict(state.decisions),
    )
    rest = run(reloaded, *commands[result.consumed :])
    assert rest.consumed == 2
    assert outcome(rest) == [("allow", None, None, False), ("reject", "generation_in_progress", None, False)]
    [turn] = rest.changes.turns
    assert turn.reserve_tokens == 110 + 700 + 2048  # R0 is the latest settled turn now


def test_b81_deleting_again_is_rejected_but_a_duplicate_is_replayed() -> None:
    delete = turn_delete(R1)
    first = run(batch_state(chats={CHAT: chat_view(stored_turn(R1, settled_tokens=1))}), delete)
    reloaded = chat_view(stored_turn(R1, settled_tokens=1, deleted=True))
    result = run(
        batch_state(
            chats={CHAT: reloaded}, decisions={(CHAT, delete.event_id): dict(first.answers[0].payload)}
        ),
        delete,
        turn_delete(R1),
    )
    assert outcome(result) == [("done", None, None, True), ("reject", "not_latest_turn", None, False)]
    assert result.changes.removed_turns == []


def test_a_stale_chat_stops_the_fold_at_its_first_command() -> None:
    view = chat_view(stored_turn(R1))
    view.stale = True
    result = run(batch_state(chats={CHAT: view}), requested(R2))
    assert (result.consumed, result.answers, result.changes.decisions) == (0, [], [])


# ------------------------------------------------------------------------------- wire validation


def test_every_decision_validates_and_carries_its_event_time() -> None:
    at = datetime(2026, 2, 28, 12, 0, 7, 123000, tzinfo=UTC)
    commands: list[tuple[TurnRequestEvent, datetime]] = [
        (requested(R1, chat=CHAT_B), at),
        (requested(R2, chat=CHAT_B), at + timedelta(seconds=1)),
        (retry(R1, R2), at + timedelta(seconds=2)),
        (edit(R3, R0, chat=CHAT_C), at + timedelta(seconds=3)),
        (chat_delete(chat=CHAT_C), at + timedelta(seconds=4)),
        (turn_delete(R2), at + timedelta(seconds=5)),
    ]
    state = batch_state(chats={CHAT: replaceable(), CHAT_C: chat_view(stored_turn(R3, settled_tokens=1))})
    result = run(state, *commands)
    assert result.consumed == len(commands)
    found = decisions(result)
    assert [(d.command, d.decision) for d in found] == [
        ("turn.requested", "allow"),
        ("turn.requested", "reject"),
        ("turn.retry", "allow"),
        ("turn.edit", "allow"),
        ("chat.delete", "done"),
        ("turn.delete", "reject"),
    ]
    for decision, (command, time), stored in zip(found, commands, result.changes.decisions, strict=True):
        assert decision.decided_at == time
        assert decision.command_event_id == command.event_id
        assert (decision.tenant_id, decision.chat_id) == (command.tenant_id, command.chat_id)
        assert not decision.replay
        assert (stored.tenant_id, stored.chat_id, stored.command_id) == (
            TENANT,
            command.chat_id,
            command_id_of(command),
        )
        assert through_the_wire(json.loads(stored.payload)) == decision
        assert (stored.command, stored.command_event_id, stored.request_id) == (
            decision.command,
            decision.command_event_id,
            decision.request_id,
        )
        assert (stored.decision, stored.error_code, stored.decided_at) == (
            decision.decision,
            decision.error_code,
            decision.decided_at,
        )
        assert json.loads(stored.payload)["decided_at"] == iso(time)
