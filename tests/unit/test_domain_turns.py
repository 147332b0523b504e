"""`apply_event`: a turn's life after admission, and `billing_event`, the wire form of its charge.

docs/contract.md, "Provider events and parking", "Settlement" (the table and late usage) and
"`usage.settled`" / "`usage.adjusted`" (the fields). Reference behaviours (test ids `bNN`): 42-62 through
the turn's events, 66-68 and 70 (first terminal wins, cancel message), 73-74, 84-87 (orphan and
liveness) and 89 (settlement uses the stored periods).

Unless a test says otherwise the turn is a running `std` turn (1M/1M: one token = one micro-credit)
with reserve_tokens 2000, max_output_tokens_applied 1000, reserved_credits_micro 10_000 and floor
50, admitted on 2026-02-28. So usage 800/200 charges 1000 (actual) and the estimate charges
est_in 1000 + floor 50 = 1050. The policy is `test_domain_admission.POLICY` (tolerance 1.10).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid5

import pytest

from minichat.domain.quota import BUCKET_TOTAL, BucketKey, QuotaRow, apply_deltas
from minichat.domain.settlement import UsageFigures
from minichat.domain.turns import (
    AssistantMessage,
    Billing,
    Step,
    TurnEvent,
    TurnRecord,
    apply_event,
    billing_event,
    billing_fields,
    billing_json,
)
from minichat.models.events import TurnState, UsageAdjusted, UsageSettled, to_json_bytes
from minichat.models.policy import Policy
from tests.unit.builders import (
    CHAT,
    NS,
    R1,
    TENANT,
    USER,
    cancelled,
    completed,
    failed,
    grace_expired,
    orphaned,
    progress,
    reported,
    through_the_wire,
    usage,
)
from tests.unit.test_domain_admission import (
    D_PREM,
    D_TOTAL,
    DAY,
    M_PREM,
    M_TOTAL,
    MONTH,
    POLICY,
    PREM,
    entry,
    make_policy,
)

T0 = datetime(2026, 2, 28, 12, 0, tzinfo=UTC)
"""Admission time of the turn."""
TURN_ID = uuid5(NS, f"turn:{CHAT}:{R1}")
ASSISTANT_ID = uuid5(NS, f"message:{CHAT}:{R1}:assistant")

ACTUAL_800_200 = 1000
ESTIMATED = 1000 + 50
RESERVED = 10_000


def running_turn(
    model: str = "std",
    *,
    selected: str | None = None,
    reserve_tokens: int = 2000,
    max_out: int = 1000,
    reserved: int = RESERVED,
    floor: int = 50,
    policy_version: int = 1,
    state: TurnState = "running",
    **fields: Any,
) -> TurnRecord:
    return TurnRecord(
        id=TURN_ID,
        tenant_id=TENANT,
        chat_id=CHAT,
        request_id=R1,
        requester_user_id=USER,
        selected_model=selected or model,
        effective_model=model,
        reserve_tokens=reserve_tokens,
        max_output_tokens_applied=max_out,
        reserved_credits_micro=reserved,
        policy_version_applied=policy_version,
        minimal_generation_floor_applied=floor,
        period_daily=DAY,
        period_monthly=MONTH,
        state=state,
        updated_at=T0,
        **fields,
    )


Timed = TurnEvent | tuple[TurnEvent, datetime]


def play(turn: TurnRecord, *events: Timed, policy: Policy = POLICY, first_offset: int = 100) -> list[Step]:
    """Apply events in order, one second apart (unless timed) with increasing offsets. Each event is
    also applied to a working copy changed in place (`own=True`, as a batch applies them): the same
    step and the same turn, every time."""
    steps = []
    working = turn.evolve()
    for index, item in enumerate(events):
        event, at = item if isinstance(item, tuple) else (item, T0 + timedelta(seconds=index + 1))
        step = apply_event(turn, event, at, first_offset + index, policy)
        in_place = apply_event(working, event, at, first_offset + index, policy, own=True)
        assert in_place.turn is working and working == step.turn
        assert dataclasses.replace(in_place, turn=step.turn) == step
        steps.append(step)
        turn = step.turn
    return steps


def at(index: int) -> datetime:
    """The time `play` gives its `index`-th event."""
    return T0 + timedelta(seconds=index + 1)


def charge(step: Step) -> tuple[object, ...]:
    """What a settling step charged: (kind, outcome, method, committed, capped)."""
    assert step.billing is not None
    s = step.billing.settlement
    return (step.billing.kind, s.outcome, s.method, s.committed_credits_micro, s.overshoot_capped)


def stored_charge(turn: TurnRecord) -> tuple[object, ...]:
    return (turn.billing_outcome, turn.settlement_method, turn.committed_credits_micro, turn.overshoot_capped)


def wire(turn: TurnRecord, billing: Billing) -> UsageSettled | UsageAdjusted:
    """`billing_event`, checked to survive the wire (JSON out, validated back in)."""
    event = billing_event(turn, billing)
    assert through_the_wire(json.loads(to_json_bytes(event))) == event
    assert billing_json(billing_fields(turn, billing)) == event.model_dump_json()  # the outbox text
    return event


def assert_noop(step: Step, before: TurnRecord, why: str) -> None:
    assert (step.changed, step.dropped) == (False, why)
    assert step.turn is before
    assert (step.billing, step.message, step.progressed, step.awaiting_usage) == (None, None, False, False)


# ---------------------------------------------------------------------------- settlement table

SOME = usage(800, 200)


@pytest.mark.parametrize(
    ("terminal", "waits", "expected"),
    [
        pytest.param(
            completed(inline=SOME),
            False,
            ("completed", None, "completed", "actual"),
            id="b42-b57-completed-usage",
        ),
        pytest.param(
            completed(), True, ("completed", None, "completed", "estimated"), id="b57-completed-no-usage"
        ),
        pytest.param(
            cancelled("part", SOME),
            False,
            ("cancelled", None, "aborted", "actual"),
            id="b58-b73-cancelled-usage",
        ),
        pytest.param(
            cancelled(), True, ("cancelled", None, "aborted", "estimated"), id="b58-cancelled-no-usage"
        ),
        pytest.param(
            failed("orphan_timeout", SOME),
            False,
            ("failed", "orphan_timeout", "aborted", "estimated"),
            id="b59-failed-orphan-timeout-ignores-usage",
        ),
        pytest.param(
            orphaned(0), False, ("failed", "orphan_timeout", "aborted", "estimated"), id="b84-turn-orphaned"
        ),
        *[
            pytest.param(
                failed(code, SOME),
                False,
                ("failed", code, "failed", "released"),
                id=f"b50-b60-released-{code}",
            )
            for code in ("context_length_exceeded", "validation_error", "provider_not_called")
        ],
        pytest.param(
            failed("validation_error"),
            False,
            ("failed", "validation_error", "failed", "released"),
            id="b60-released-no-usage",
        ),
        *[
            pytest.param(
                failed(code, SOME), False, ("failed", code, "failed", "actual"), id=f"b61-b74-{code}-usage"
            )
            for code in (
                "provider_error",
                "provider_timeout",
                "rate_limited",
                "web_search_calls_exceeded",
                "code_interpreter_calls_exceeded",
            )
        ],
        *[
            pytest.param(
                failed(code), True, ("failed", code, "failed", "estimated"), id=f"b61-{code}-no-usage"
            )
            for code in (
                "provider_error",
                "provider_timeout",
                "rate_limited",
                "web_search_calls_exceeded",
                "code_interpreter_calls_exceeded",
            )
        ],
        pytest.param(
            failed("message_persistence_failed", SOME),
            False,
            ("failed", "message_persistence_failed", "failed", "estimated"),
            id="b62-unknown-code-estimated-now",
        ),
    ],
)
def test_settlement_table(
    terminal: TurnEvent, waits: bool, expected: tuple[str, str | None, str, str]
) -> None:
    state, code, outcome, method = expected
    committed = {"actual": ACTUAL_800_200, "estimated": ESTIMATED, "released": 0}[method]
    turn = running_turn()
    events: list[Timed] = [terminal, grace_expired()] if waits else [terminal]
    steps = play(turn, *events)
    first, last = steps[0], steps[-1]

    assert first.changed and first.awaiting_usage is waits
    assert (first.turn.state, first.turn.error_code, first.turn.completed_at) == (state, code, at(0))
    if waits:
        assert first.billing is None and first.turn.settled_at is None
    assert charge(last) == ("usage.settled", outcome, method, committed, False)
    settled = last.turn
    assert stored_charge(settled) == (outcome, method, committed, False)
    assert settled.settled_at == at(len(steps) - 1)
    assert last.billing is not None
    assert last.billing.settlement.unknown_error_code is (code == "message_persistence_failed")
    event = wire(settled, last.billing)
    assert isinstance(event, UsageSettled)
    assert (event.terminal_state, event.billing_outcome, event.settlement_method) == (state, outcome, method)
    assert (event.error_code, event.committed_credits_micro, event.settled_at) == (
        code,
        committed,
        at(len(steps) - 1),
    )
    deltas = dict(last.billing.deltas)
    assert deltas[D_TOTAL] == deltas[M_TOTAL]
    assert (
        deltas[D_TOTAL].spent_credits_micro,
        deltas[D_TOTAL].reserved_credits_micro,
        deltas[D_TOTAL].calls,
    ) == (
        committed,
        -RESERVED,
        1,
    )
    actual_tokens = (800, 200) if method == "actual" else (0, 0)
    assert (deltas[D_TOTAL].input_tokens, deltas[D_TOTAL].output_tokens) == actual_tokens


@pytest.mark.parametrize(
    ("terminal", "message_usage"),
    [
        pytest.param(completed(), True, id="completed"),
        pytest.param(cancelled("partial"), True, id="cancelled-with-text"),
        pytest.param(cancelled(""), False, id="cancelled-empty"),
        pytest.param(failed("provider_error"), False, id="failed-provider-error"),
    ],
)
def test_waiting_turn_settles_on_the_usage_report(terminal: TurnEvent, message_usage: bool) -> None:
    turn = running_turn()
    waiting, settling, grace, again = play(
        turn, terminal, reported(800, 200, model="provider-model"), grace_expired(), reported(1, 1)
    )
    assert waiting.awaiting_usage and waiting.billing is None
    assert settling.changed and not settling.awaiting_usage
    assert settling.message_usage is message_usage
    assert charge(settling)[2:] == ("actual", ACTUAL_800_200, False)
    assert settling.turn.usage == UsageFigures(800, 200)
    assert (settling.turn.usage_model, settling.turn.settled_at, settling.turn.completed_at) == (
        "provider-model",
        at(1),
        at(0),
    )
    assert settling.billing is not None
    event = wire(settling.turn, settling.billing)
    assert event.usage is not None and (event.usage.input_tokens, event.usage.model) == (
        800,
        "provider-model",
    )
    assert_noop(grace, settling.turn, "not_waiting_for_usage")
    assert_noop(again, settling.turn, "usage_already_reported")


def test_grace_expiry_settles_estimated_and_a_late_grace_changes_nothing() -> None:
    turn = running_turn()
    _, settling, again = play(turn, completed(), grace_expired(), grace_expired())
    assert charge(settling) == ("usage.settled", "completed", "estimated", ESTIMATED, False)
    assert settling.turn.usage is None
    assert settling.billing is not None and wire(settling.turn, settling.billing).usage is None
    assert_noop(again, settling.turn, "not_waiting_for_usage")


def test_grace_expiry_of_a_running_or_settled_turn_changes_nothing() -> None:
    turn = running_turn()
    [early] = play(turn, grace_expired())
    assert_noop(early, turn, "not_waiting_for_usage")
    released, late = play(turn, failed("validation_error"), grace_expired())
    assert_noop(late, released.turn, "not_waiting_for_usage")


# -------------------------------------------------------------------------- usage before terminal


@pytest.mark.parametrize(
    ("terminal", "expected"),
    [
        pytest.param(completed(), ("completed", "actual", ACTUAL_800_200), id="completed"),
        pytest.param(
            completed(inline=usage(5, 5)),
            ("completed", "actual", ACTUAL_800_200),
            id="first-report-wins-over-inline",
        ),
        pytest.param(cancelled("x"), ("aborted", "actual", ACTUAL_800_200), id="cancelled"),
        pytest.param(failed("rate_limited"), ("failed", "actual", ACTUAL_800_200), id="failed-usage-code"),
        pytest.param(failed("provider_not_called"), ("failed", "released", 0), id="released-ignores-it"),
        pytest.param(orphaned(0), ("aborted", "estimated", ESTIMATED), id="b87-orphan-ignores-it"),
    ],
)
def test_usage_before_the_terminal_event(terminal: TurnEvent, expected: tuple[object, ...]) -> None:
    turn = running_turn()
    early, final = play(turn, reported(800, 200, web_search_calls=3, code_interpreter_calls=2), terminal)
    assert early.changed and early.billing is None and not early.awaiting_usage and early.message is None
    assert (early.turn.state, early.turn.usage, early.turn.settled_at) == (
        "running",
        UsageFigures(800, 200, 0, 0, 0, 3, 2),
        None,
    )
    assert not final.awaiting_usage
    assert charge(final)[1:4] == expected
    assert final.turn.usage == early.turn.usage
    if final.message is not None:
        assert final.message.usage == early.turn.usage
    assert final.billing is not None
    event = wire(final.turn, final.billing)
    # b87: the tool calls that happened count on every path, released included (nothing is
    # charged there, but the calls were made).
    assert (event.web_search_calls, event.code_interpreter_calls) == (3, 2)
    assert event.usage is not None and event.usage.input_tokens == 800


# ------------------------------------------------------------------------- first terminal wins


FIRST: dict[str, TurnEvent] = {
    "completed": completed(inline=SOME),
    "completed-waiting": completed(),
    "failed": failed("provider_error"),
    "cancelled": cancelled("part"),
    "orphaned": orphaned(0),
}
LATER_EVENTS: dict[str, Callable[[], TurnEvent]] = {
    "completed": lambda: completed("other", SOME),
    "failed": lambda: failed("provider_error", SOME),
    "cancelled": lambda: cancelled("other", SOME),
    "orphaned": lambda: orphaned(0),
    "progress": progress,
}


@pytest.mark.parametrize("second", list(LATER_EVENTS))
@pytest.mark.parametrize("first", list(FIRST))
def test_b66_b67_b68_first_terminal_wins(first: str, second: str) -> None:
    turn = running_turn()
    [won] = play(turn, FIRST[first])
    [lost] = play(won.turn, LATER_EVENTS[second](), first_offset=500)
    assert_noop(lost, won.turn, "not_running")


# ---------------------------------------------------------------------------- progress, orphan


def test_b84_progress_is_counted_once_per_offset() -> None:
    turn = running_turn()
    p = progress()
    steps = [
        apply_event(turn, p, at(0), 7, POLICY),
    ]
    steps.append(apply_event(steps[-1].turn, p, at(1), 7, POLICY))  # the same record again
    steps.append(apply_event(steps[-1].turn, progress(), at(2), 6, POLICY))  # an older record
    steps.append(apply_event(steps[-1].turn, progress(), at(3), 8, POLICY))
    first, same, older, nxt = steps
    assert first.changed and first.progressed and first.billing is None
    assert (first.turn.progress_seq, first.turn.progress_offset, first.turn.last_progress_at) == (1, 7, at(0))
    assert first.turn.updated_at == at(0)
    assert_noop(same, first.turn, "progress_seen")
    assert_noop(older, first.turn, "progress_seen")
    assert (nxt.turn.progress_seq, nxt.turn.progress_offset, nxt.turn.last_progress_at) == (2, 8, at(3))
    assert nxt.progressed and nxt.turn.state == "running"


def test_progress_offset_zero_counts() -> None:
    [step] = play(running_turn(), progress(), first_offset=0)
    assert (step.turn.progress_seq, step.turn.progress_offset) == (1, 0)


@pytest.mark.parametrize(
    ("seen_seq", "applies"),
    [
        pytest.param(2, True, id="b84-seq-matches"),
        pytest.param(1, False, id="b85-progress-moved-on"),
        pytest.param(3, False, id="seq-from-the-future"),
    ],
)
def test_orphan_applies_only_to_the_progress_it_saw(seen_seq: int, applies: bool) -> None:
    turn = running_turn()
    _, moved, last = play(turn, progress(), progress(), orphaned(seen_seq))
    before = moved.turn
    if applies:
        assert (last.turn.state, last.turn.error_code) == ("failed", "orphan_timeout")
        assert charge(last) == ("usage.settled", "aborted", "estimated", ESTIMATED, False)
    else:
        assert_noop(last, before, "progress_moved_on")
        assert last.turn.progress_seq == 2


def test_b86_orphan_charges_the_floor_only() -> None:
    turn = running_turn(reserve_tokens=100, max_out=4096, reserved=4196, floor=10)
    [step] = play(turn, orphaned(0))
    assert charge(step) == ("usage.settled", "aborted", "estimated", 10, False)
    assert step.message is None and step.turn.assistant_message_id is None
    assert step.billing is not None
    event = wire(step.turn, step.billing)
    assert (event.terminal_state, event.billing_outcome, event.error_code) == (
        "failed",
        "aborted",
        "orphan_timeout",
    )
    assert event.usage is None


# -------------------------------------------------------------------------------- overshoot


@pytest.mark.parametrize(
    ("reserve_tokens", "reserved", "tokens", "committed", "capped"),
    [
        pytest.param(2000, RESERVED, (800, 200), 1000, False, id="b42"),
        pytest.param(1000, RESERVED, (800, 250), 1050, False, id="b43-within-tolerance"),
        pytest.param(1000, RESERVED, (600, 500), 1100, False, id="b45-exactly-at-tolerance"),
        pytest.param(1000, RESERVED, (601, 500), RESERVED, True, id="b45-one-token-over"),
        pytest.param(1000, RESERVED, (1000, 500), RESERVED, True, id="b44"),
        pytest.param(10_000, 2_500_000, (11_000, 500), 2_500_000, True, id="b46"),
    ],
)
@pytest.mark.parametrize("route", ["inline", "reported-later", "adjusted"])
def test_overshoot_boundary(
    reserve_tokens: int, reserved: int, tokens: tuple[int, int], committed: int, capped: bool, route: str
) -> None:
    turn = running_turn(reserve_tokens=reserve_tokens, reserved=reserved)
    late = reported(*tokens)
    if route == "inline":
        steps = play(turn, completed(inline=usage(*tokens)))
    elif route == "reported-later":
        steps = play(turn, completed(), late)
    else:
        steps = play(turn, completed(), grace_expired(), late)
    last = steps[-1]
    kind = "usage.adjusted" if route == "adjusted" else "usage.settled"
    assert charge(last) == (kind, "completed", "actual", committed, capped)
    assert last.turn.overshoot_capped is capped
    assert last.billing is not None
    # b46: a capped turn still reports its real tokens on the `total` rows.
    assert (
        dict(last.billing.deltas)[D_TOTAL].input_tokens,
        dict(last.billing.deltas)[D_TOTAL].output_tokens,
    ) == tokens
    assert wire(last.turn, last.billing).overshoot_capped is capped


# ------------------------------------------------------------------------------- zero usage


@pytest.mark.parametrize(
    "terminal",
    [
        pytest.param(completed(inline=usage(0, 0)), id="completed"),
        pytest.param(cancelled("", usage(0, 0, web_search_calls=1)), id="b58-cancelled-zeros"),
        pytest.param(failed("provider_error", usage(0, 0)), id="failed-usage-code"),
    ],
)
def test_zero_usage_counts_as_unknown(terminal: TurnEvent) -> None:
    turn = running_turn()
    waiting, settled = play(turn, terminal, grace_expired())
    assert waiting.awaiting_usage and waiting.billing is None
    assert charge(settled)[2:] == ("estimated", ESTIMATED, False)
    assert settled.billing is not None
    assert dict(settled.billing.deltas)[D_TOTAL].input_tokens == 0


def test_a_zero_usage_report_does_not_price_at_actual() -> None:
    """turns.py settles on a report of zeros right away, on the estimated path (its docstring: "a
    report of zeros is final too"); the contract would keep waiting "until usage is known, or until
    usage_grace_s" (reported as doubtful). Either way zeros never settle on the actual path at 0."""
    turn = running_turn()
    _, step = play(turn, cancelled(""), reported(0, 0))
    if step.billing is None:
        assert step.turn.settled_at is None
    else:
        assert charge(step)[2:] == ("estimated", ESTIMATED, False)


@pytest.mark.parametrize(
    "zeros_first",
    [
        pytest.param([completed(inline=usage(0, 0))], id="inline-zeros-then-wait"),
        pytest.param([reported(0, 0), completed()], id="zeros-reported-while-running"),
        pytest.param([completed(), reported(0, 0)], id="zeros-reported-while-waiting"),
        pytest.param([completed(), grace_expired(), reported(0, 0)], id="zeros-reported-after-estimate"),
    ],
)
def test_real_usage_after_zeros_is_priced(zeros_first: list[TurnEvent]) -> None:
    turn = running_turn()
    steps = play(turn, *zeros_first, reported(800, 200))
    billed = [s for s in steps if s.billing is not None]
    assert billed, "nothing settled"
    assert (billed[-1].turn.settlement_method, billed[-1].turn.committed_credits_micro) == (
        "actual",
        ACTUAL_800_200,
    )


# -------------------------------------------------------------------------------- late usage


def test_late_usage_after_an_estimated_settlement_is_adjusted() -> None:
    turn = running_turn("prem")
    late_at = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # another day and month: same rows anyway
    _, estimated, adjusted, again = play(
        turn,
        completed(),
        grace_expired(),
        (reported(800, 200, web_search_calls=1, model="m-2026"), late_at),
        (reported(900, 300), late_at + timedelta(seconds=1)),
    )
    assert charge(estimated) == ("usage.settled", "completed", "estimated", ESTIMATED, False)
    assert charge(adjusted) == ("usage.adjusted", "completed", "actual", ACTUAL_800_200, False)
    assert adjusted.billing is not None
    assert adjusted.billing.previous_committed_credits_micro == ESTIMATED
    assert adjusted.message_usage  # the completed turn's message gets the tokens now
    deltas = dict(adjusted.billing.deltas)
    assert list(deltas) == [D_PREM, D_TOTAL, M_PREM, M_TOTAL]
    diff = ACTUAL_800_200 - ESTIMATED
    assert deltas[D_TOTAL] == deltas[M_TOTAL] == QuotaRow(diff, 0, 0, 800, 200, 1, 0)
    assert deltas[D_PREM] == deltas[M_PREM] == QuotaRow(diff)

    final = adjusted.turn
    assert stored_charge(final) == ("completed", "actual", ACTUAL_800_200, False)
    assert (final.settled_at, final.adjusted_at) == (at(1), late_at)

    event = wire(final, adjusted.billing)
    assert isinstance(event, UsageAdjusted)
    assert event.dedupe_key == f"{TENANT.hex}/{TURN_ID.hex}/{R1.hex}/adjusted"
    assert (event.previous_committed_credits_micro, event.committed_credits_micro) == (
        ESTIMATED,
        ACTUAL_800_200,
    )
    assert (event.settlement_method, event.billing_outcome, event.settled_at) == (
        "actual",
        "completed",
        late_at,
    )
    assert (event.period_daily, event.period_monthly) == (DAY, MONTH)
    assert event.usage is not None and (event.usage.model, event.usage.web_search_calls) == ("m-2026", 1)

    assert_noop(again, final, "usage_already_reported")

    # The rows end as if the turn had settled on its actual usage in the first place.
    rows = {key: QuotaRow(reserved_credits_micro=RESERVED) for key in deltas}
    assert estimated.billing is not None
    rows = apply_deltas(rows, estimated.billing.deltas)
    rows = apply_deltas(rows, adjusted.billing.deltas)
    assert rows[D_TOTAL] == QuotaRow(ACTUAL_800_200, 0, 1, 800, 200, 1, 0)
    assert rows[D_PREM] == QuotaRow(ACTUAL_800_200, 0, 1)


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param([orphaned(0)], id="orphan-timeout-ignores-usage"),
        pytest.param([failed("some_new_code")], id="unknown-code-ignores-usage"),
        pytest.param([failed("validation_error")], id="released-stays-released"),
    ],
)
def test_late_usage_that_does_not_reprice(ending: list[TurnEvent]) -> None:
    turn = running_turn()
    *_, settled, late = play(turn, *ending, reported(800, 200))
    assert late.changed and late.billing is None
    assert late.turn.usage == UsageFigures(800, 200)
    assert stored_charge(late.turn) == stored_charge(settled.turn)
    assert late.turn.adjusted_at is None


def test_late_usage_after_an_actual_settlement_is_dropped() -> None:
    turn = running_turn()
    settled, late = play(turn, completed(inline=SOME), reported(1, 1))
    assert_noop(late, settled.turn, "usage_already_reported")


# ------------------------------------------------------------------------------ assistant message


@pytest.mark.parametrize(
    ("terminal", "content"),
    [
        pytest.param(
            completed("the answer", SOME, provider_response_id="resp-1", finish_reason="length"),
            "the answer",
            id="completed",
        ),
        pytest.param(cancelled("partial text"), "partial text", id="b70-cancelled-with-text"),
        pytest.param(cancelled(""), None, id="b70-cancelled-empty"),
        pytest.param(failed("provider_error", SOME), None, id="failed"),
        pytest.param(orphaned(0), None, id="orphaned"),
    ],
)
def test_assistant_message(terminal: TurnEvent, content: str | None) -> None:
    turn = running_turn("std", selected="prem")  # a downgraded turn: the message names the effective model
    [step] = play(turn, terminal)
    if content is None:
        assert step.message is None and step.turn.assistant_message_id is None
        return
    assert step.message == AssistantMessage(
        id=ASSISTANT_ID,
        tenant_id=TENANT,
        chat_id=CHAT,
        request_id=R1,
        content=content,
        model="std",
        provider_response_id="resp-1" if terminal.type == "turn.completed" else None,
        usage=UsageFigures(800, 200) if terminal.type == "turn.completed" else None,
        created_at=at(0),
    )
    assert step.turn.assistant_message_id == ASSISTANT_ID
    if terminal.type == "turn.completed":
        assert (step.turn.finish_reason, step.turn.provider_response_id) == ("length", "resp-1")


# -------------------------------------------------------------------------------- billing_event


def test_billing_event_fields() -> None:
    turn = running_turn("std", selected="prem", policy_version=7)
    [step] = play(
        turn,
        failed(
            "provider_error",
            usage(
                800,
                200,
                cache_read_input_tokens=100,
                cache_write_input_tokens=10,
                reasoning_tokens=50,
                web_search_calls=2,
                code_interpreter_calls=1,
                model="std-2026-01",
            ),
        ),
    )
    assert step.billing is not None
    event = wire(step.turn, step.billing)
    assert re.fullmatch(r"[0-9a-f]{32}/[0-9a-f]{32}/[0-9a-f]{32}", event.dedupe_key)
    assert event.model_dump(mode="json") == {
        "type": "usage.settled",
        "schema_version": 1,
        "dedupe_key": f"{TENANT.hex}/{TURN_ID.hex}/{R1.hex}",
        "tenant_id": str(TENANT),
        "user_id": str(USER),
        "chat_id": str(CHAT),
        "turn_id": str(TURN_ID),
        "request_id": str(R1),
        "selected_model": "prem",
        "effective_model": "std",
        "terminal_state": "failed",
        "billing_outcome": "failed",
        "settlement_method": "actual",
        "error_code": "provider_error",
        "usage": {
            "input_tokens": 800,
            "output_tokens": 200,
            "cache_read_input_tokens": 100,
            "cache_write_input_tokens": 10,
            "reasoning_tokens": 50,
            "web_search_calls": 2,
            "code_interpreter_calls": 1,
            "model": "std-2026-01",
        },
        "reserve_tokens": 2000,
        "reserved_credits_micro": RESERVED,
        "committed_credits_micro": ACTUAL_800_200,
        "overshoot_capped": False,
        "policy_version_applied": 7,
        "web_search_calls": 2,
        "code_interpreter_calls": 1,
        "period_daily": "2026-02-28",
        "period_monthly": "2026-02-01",
        "settled_at": "2026-02-28T12:00:01Z",
    }


def test_settlement_uses_the_turns_periods_and_snapshot() -> None:
    """b89 (docs/behaviours.md): a turn admitted on Feb 28 that ends on Mar 1 settles on the February rows."""
    turn = running_turn()
    [step] = play(turn, (completed(inline=SOME), datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC)))
    assert step.billing is not None
    assert [key for key, _ in step.billing.deltas] == [D_TOTAL, M_TOTAL]
    event = wire(step.turn, step.billing)
    assert (event.period_daily, event.period_monthly) == (DAY, MONTH)
    # The charge uses the snapshot it is given (the admitting version), not the live policy.
    pricier = make_policy(PREM, entry("std", "standard", mult=3_000_000, default=True))
    [step3] = play(turn, completed(inline=SOME), policy=pricier)
    assert charge(step3)[3] == 3 * ACTUAL_800_200


# -------------------------------------------------------------------------------- quota deltas


@pytest.mark.parametrize(
    ("model", "keys"),
    [
        pytest.param("std", [D_TOTAL, M_TOTAL], id="b54-standard-two-rows"),
        pytest.param("prem", [D_PREM, D_TOTAL, M_PREM, M_TOTAL], id="b54-premium-four-rows"),
    ],
)
@pytest.mark.parametrize(
    ("events", "committed", "tokens"),
    [
        pytest.param(
            [completed(inline=usage(800, 200, web_search_calls=2, code_interpreter_calls=3))],
            ACTUAL_800_200,
            (800, 200, 2, 3),
            id="b51-b53-actual",
        ),
        pytest.param([cancelled(""), grace_expired()], ESTIMATED, (0, 0, 0, 0), id="b47-estimated"),
        pytest.param([failed("context_length_exceeded")], 0, (0, 0, 0, 0), id="b50-released"),
    ],
)
def test_settlement_deltas(
    model: str, keys: list[BucketKey], events: list[TurnEvent], committed: int, tokens: tuple[int, ...]
) -> None:
    turn = running_turn(model)
    last = play(turn, *events)[-1]
    assert last.billing is not None and last.billing.kind == "usage.settled"
    deltas = last.billing.deltas
    assert [key for key, _ in deltas] == keys
    for key, delta in deltas:
        assert (delta.reserved_credits_micro, delta.calls, delta.spent_credits_micro) == (
            -RESERVED,
            1,
            committed,
        )
        on_total = key.bucket == BUCKET_TOTAL
        expected = tokens if on_total else (0, 0, 0, 0)
        assert (
            delta.input_tokens,
            delta.output_tokens,
            delta.web_search_calls,
            delta.code_interpreter_calls,
        ) == expected
    # b55: the reserve is released exactly; nothing is left reserved.
    rows = apply_deltas({key: QuotaRow(reserved_credits_micro=RESERVED) for key in keys}, deltas)
    assert all(row.reserved_credits_micro == 0 and row.calls == 1 for row in rows.values())


def test_settlement_happens_once() -> None:
    turn = running_turn()
    steps = play(
        turn,
        progress(),
        reported(800, 200),
        completed(),
        grace_expired(),
        failed("provider_error", SOME),
        orphaned(1),
        reported(900, 100),
        progress(),
    )
    assert [s.billing.kind for s in steps if s.billing is not None] == ["usage.settled"]


def test_released_settlement_counts_reported_tool_calls() -> None:
    turn = running_turn()
    [step] = play(turn, failed("context_length_exceeded", usage(10, 10, web_search_calls=2)))
    assert step.billing is not None
    assert dict(step.billing.deltas)[D_TOTAL].web_search_calls == 2
