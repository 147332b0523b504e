"""The outputs encoded once, without their wire models, give the models' bytes exactly.

A `turn.decision` is built as its fields and encoded once by pydantic-core; a billing event
likewise. The stored decision (`turn_decisions.payload`), the decision's record value and the
billing outbox text must stay what the models gave: generated decisions (every decision, every
error code, every quota scope and downgrade reason, non-ASCII strings) and generated billing events
are encoded both ways here and compared byte for byte; each is also validated by its model, so the
contract's rules hold for what the fast path builds. The overshoot check's integer ratio is
compared with the exact `Fraction` comparison around every boundary.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any, get_args
from uuid import UUID

import pytest

from minichat.domain.admission import Admission, MutationResult
from minichat.domain.decisions import admission_decision, decision_encoding, mutation_decision
from minichat.domain.periods import periods_for
from minichat.domain.settlement import Settlement, UsageFigures, exceeds_tolerance
from minichat.domain.turns import Billing, TurnRecord, billing_event, billing_fields, billing_json
from minichat.models.events import TurnDecision
from minichat.models.events.vocabulary import (
    BillingOutcome,
    DecisionErrorCode,
    DowngradeReason,
    QuotaScope,
    SettlementMethod,
)
from tests.unit.builders import chat_delete, edit, requested, retry, turn_delete

ERROR_CODES: tuple[DecisionErrorCode, ...] = get_args(DecisionErrorCode)
MUTATION_CODES: tuple[DecisionErrorCode, ...] = (
    "chat_not_found", "turn_not_found", "forbidden", "invalid_turn_state", "not_latest_turn",
)  # fmt: skip
SCOPES: tuple[QuotaScope, ...] = get_args(QuotaScope)
REASONS: tuple[DowngradeReason, ...] = get_args(DowngradeReason)
NAMES = (
    "std",
    "prem-1",
    "modèle-é",
    "模型",
    "emoji-🙂",
    'q"uote\\back',
    "tab\tnl\n",
    "ctl\x01\x1f",
    "\u2028",
)
"""Model names: the selected one is the caller's own string; non-ASCII ones are escaped on the wire."""


def _uuid(rng: random.Random) -> UUID:
    return UUID(int=rng.getrandbits(128), version=4)


def _time(rng: random.Random) -> datetime:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**8))
    if rng.random() < 0.5:
        at += timedelta(milliseconds=rng.randrange(1000))
    if rng.random() < 0.1:
        at += timedelta(microseconds=rng.randrange(1, 1000))
    if rng.random() < 0.1:
        at = at.astimezone(timezone(timedelta(hours=rng.randrange(-12, 13))))
    return at


def _old_wire(model: TurnDecision) -> bytes:
    """The record value as the handler encoded it: `json.dumps` of the decision's JSON form."""
    return json.dumps({**model.model_dump(mode="json"), "replay": False}, separators=(",", ":")).encode()


def _admission(rng: random.Random, at: datetime) -> Admission:
    periods = periods_for(at)
    selected = rng.choice((*NAMES, None))
    kind = rng.choice(("allow", "downgrade", "reject"))
    if kind == "reject":
        code = rng.choice(ERROR_CODES)
        scope = rng.choice(SCOPES) if code == "quota_exceeded" else None
        return Admission(
            "reject", rng.randrange(1, 99), periods, selected, error_code=code, quota_scope=scope
        )
    downgraded = kind == "downgrade"
    return Admission(
        kind,
        rng.randrange(1, 99),
        periods,
        selected,
        effective_model=rng.choice(NAMES),
        downgrade_from=selected if downgraded else None,
        downgrade_reason=rng.choice(REASONS) if downgraded else None,
        max_output_tokens=rng.randrange(0, 10**6),
        reserve_tokens=rng.randrange(0, 10**9),
        reserved_credits_micro=rng.randrange(0, 10**15),
    )


def _decisions(seed: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        at = _time(rng)
        ids = {"chat": _uuid(rng), "tenant": _uuid(rng), "user": _uuid(rng), "eid": _uuid(rng)}
        request, new = _uuid(rng), _uuid(rng)
        kind = rng.randrange(5)
        if kind == 0:
            command: Any = requested(request, model=rng.choice(NAMES), **ids)
        elif kind == 1:
            command = retry(request, new, **ids)
        elif kind == 2:
            command = edit(request, new, **ids)
        if kind <= 2:
            made.append(admission_decision(command, _admission(rng, at), at))
            continue
        command = turn_delete(request, **ids) if kind == 3 else chat_delete(**ids)
        rejected = rng.random() < 0.6
        outcome = MutationResult("reject", rng.choice(MUTATION_CODES)) if rejected else MutationResult("done")
        made.append(mutation_decision(command, outcome, at))
    return made


def test_generated_decisions_cover_every_decision_and_error_code() -> None:
    made = _decisions(1, 3000)
    assert {d["decision"] for d in made} == {"allow", "downgrade", "reject", "done"}
    assert {d["error_code"] for d in made} == {*ERROR_CODES, None}
    assert {d["quota_scope"] for d in made} == {*SCOPES, None}
    assert {d["downgrade_reason"] for d in made} == {*REASONS, None}
    assert {d["command"] for d in made} == {
        "turn.requested",
        "turn.retry",
        "turn.edit",
        "turn.delete",
        "chat.delete",
    }


@pytest.mark.parametrize("seed", range(4))
def test_a_decision_encodes_as_its_model_did(seed: int) -> None:
    """The stored text is `model_dump_json`; the record value is what `json.dumps` of the model's
    JSON form gave (non-ASCII escaped); the model accepts the fields (the contract's rules)."""
    for fields in _decisions(seed, 2000):
        model = TurnDecision(**fields)  # validates: the rules of `turn.decision`
        text, value = decision_encoding(fields)
        assert text == model.model_dump_json()
        assert value == _old_wire(model)
        assert TurnDecision.model_validate_json(value) == model


def _turn(rng: random.Random) -> TurnRecord:
    settled_at = _time(rng)
    day = periods_for(settled_at - timedelta(seconds=rng.randrange(3600)))
    state = rng.choice(("completed", "failed", "cancelled"))
    known = rng.random() < 0.8
    figures = UsageFigures(*(rng.randrange(0, 10**6) for _ in range(7))) if known else None
    return TurnRecord(
        id=_uuid(rng),
        tenant_id=_uuid(rng),
        chat_id=_uuid(rng),
        request_id=_uuid(rng),
        requester_user_id=_uuid(rng),
        selected_model=rng.choice(NAMES),
        effective_model=rng.choice(NAMES),
        reserve_tokens=rng.randrange(0, 10**7),
        max_output_tokens_applied=rng.randrange(0, 10**6),
        reserved_credits_micro=rng.randrange(0, 10**12),
        policy_version_applied=rng.randrange(1, 50),
        minimal_generation_floor_applied=rng.randrange(0, 500),
        period_daily=day.daily,
        period_monthly=day.monthly,
        state=state,
        updated_at=settled_at,
        error_code=None if state != "failed" else rng.choice(("provider_error", "orphan_timeout", "x-é")),
        usage=figures,
        usage_model=rng.choice((*NAMES, None)) if figures else None,
        settled_at=settled_at,
        adjusted_at=settled_at
        + timedelta(seconds=rng.randrange(1, 10**5), microseconds=rng.randrange(10**6)),
    )


def _billing(rng: random.Random) -> Billing:
    outcome: BillingOutcome = rng.choice(get_args(BillingOutcome))
    method: SettlementMethod = rng.choice(get_args(SettlementMethod))
    committed = 0 if method == "released" else rng.randrange(0, 10**12)
    settlement = Settlement(
        outcome,
        method,
        committed,
        overshoot_capped=rng.random() < 0.3,
        web_search_calls=rng.randrange(0, 100),
        code_interpreter_calls=rng.randrange(0, 100),
    )
    if rng.random() < 0.3:
        return Billing(
            "usage.adjusted", settlement, (), previous_committed_credits_micro=rng.randrange(10**12)
        )
    return Billing("usage.settled", settlement, ())


@pytest.mark.parametrize("seed", range(4))
def test_a_billing_event_encodes_as_its_model_did(seed: int) -> None:
    """The outbox text (the bytes the relay publishes) is the wire model's `model_dump_json`."""
    rng = random.Random(seed)
    kinds = set()
    for _ in range(2000):
        turn, billing = _turn(rng), _billing(rng)
        event = billing_event(turn, billing)  # validates: the rules of the billing events
        assert billing_json(billing_fields(turn, billing)) == event.model_dump_json()
        kinds.add((billing.kind, turn.usage is None, billing.settlement.method))
    assert len(kinds) == 2 * 2 * 3


TOLERANCES = (
    1.0,
    1.01,
    1.05,
    1.1,
    1.15,
    1.2,
    1.25,
    1.3,
    1.333,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    1.001,
    1.123456789,
    10.0,
)


@pytest.mark.parametrize("tolerance", TOLERANCES)
def test_the_overshoot_check_is_the_exact_decimal_comparison(tolerance: float) -> None:
    """`actual > reserve · tolerance` with the tolerance as the decimal written in the policy file,
    for every reserve up to 3000 (and some large ones) and every actual around the boundary."""
    exact = Fraction(str(tolerance))
    reserves = [*range(3001), 10**6 - 1, 10**6, 123_456_789, 10**12 + 7]
    for reserve in reserves:
        boundary = reserve * exact
        for actual in range(max(0, int(boundary) - 3), int(boundary) + 4):
            assert exceeds_tolerance(actual, reserve, tolerance) is (actual > boundary), (actual, reserve)
