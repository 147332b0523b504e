"""Settlement: behaviours b25-b26, b42-b56, b57-b62 and b86-b87 (docs/behaviours.md), at
the contract's divisor and with the contract's settlement table.

Models are priced 1M/1M (one token = one micro-credit) unless a test says otherwise.
"""

from __future__ import annotations

import pytest

from minichat.domain.admission import ChatState
from minichat.domain.periods import Periods
from minichat.domain.quota import BucketKey, QuotaRow, apply_deltas, apply_reserve
from minichat.domain.settlement import (
    Settlement,
    SettlementError,
    TerminalState,
    TurnCharge,
    UsageFigures,
    adjustment_deltas,
    awaits_usage,
    billing_rule,
    exceeds_tolerance,
    reprice,
    settle,
    settlement_deltas,
)
from minichat.models.policy import Policy
from tests.unit.test_domain_admission import (
    CONTENT_1000,
    D_PREM,
    D_TOTAL,
    DAY,
    M_PREM,
    M_TOTAL,
    MONTH,
    POLICY,
    POLICY_510,
    ROWS_510,
    entry,
    make_policy,
    request,
)

PERIODS = Periods(DAY, MONTH)


def turn(
    reserve_tokens: int = 2000,
    max_out: int = 1000,
    reserved: int = 10_000,
    floor: int = 50,
    model: str = "std",
) -> TurnCharge:
    return TurnCharge(model, reserve_tokens, max_out, reserved, floor, PERIODS)


def completed(charge: TurnCharge, usage: UsageFigures | None, policy: Policy = POLICY) -> Settlement:
    return settle(charge, usage, "completed", None, policy)


def summary(s: Settlement) -> tuple[object, ...]:
    return (s.outcome, s.method, s.committed_credits_micro, s.overshoot_capped)


# --- the worked example (b22-b27, multipliers scaled ×1000 for the contract's divisor) -----------

TURN_510 = TurnCharge("S", 1500, 500, 1_500_000, 50, PERIODS)


def test_b25_settle_the_downgraded_turn() -> None:
    admitted = request(POLICY_510, ChatState(quota=ROWS_510), model="P", content=CONTENT_1000)
    rows = apply_reserve(ROWS_510, admitted.reserve_deltas)
    result = completed(TURN_510, UsageFigures(900, 300), POLICY_510)
    assert summary(result) == ("completed", "actual", 1_200_000, False)
    rows = apply_deltas(rows, settlement_deltas(TURN_510, result, POLICY_510))
    assert rows[D_TOTAL] == QuotaRow(26_200_000, 0, 1, 900, 300)
    assert rows[M_TOTAL] == QuotaRow(241_200_000, 0, 1, 900, 300)
    assert rows[D_PREM] == ROWS_510[D_PREM]


def test_b26_exact_use_charges_the_reserve() -> None:
    assert completed(TURN_510, UsageFigures(1000, 500), POLICY_510).committed_credits_micro == 1_500_000


# --- amounts (docs/behaviours.md, settlement) ------------------------------------------------------


@pytest.mark.parametrize(
    ("charge", "usage", "expected"),
    [
        pytest.param(
            turn(2000), UsageFigures(800, 200), ("completed", "actual", 1000, False), id="b42-actual"
        ),
        pytest.param(
            turn(1000),
            UsageFigures(800, 250),
            ("completed", "actual", 1050, False),
            id="b43-within-tolerance",
        ),
        pytest.param(
            turn(1000), UsageFigures(1000, 500), ("completed", "actual", 10_000, True), id="b44-capped"
        ),
        pytest.param(
            turn(1000),
            UsageFigures(600, 500),
            ("completed", "actual", 1100, False),
            id="b45-boundary-inclusive",
        ),
        pytest.param(
            turn(1000), UsageFigures(601, 500), ("completed", "actual", 10_000, True), id="b45-one-over"
        ),
        pytest.param(
            turn(10_000, reserved=2_500_000),
            UsageFigures(11_000, 500),
            ("completed", "actual", 2_500_000, True),
            id="b46",
        ),
        pytest.param(turn(2000, 1000), None, ("completed", "estimated", 1050, False), id="b47-estimated"),
        pytest.param(
            turn(100, 200), None, ("completed", "estimated", 50, False), id="b49-est-in-clamps-to-0"
        ),
        pytest.param(
            turn(100, 4096, floor=10), None, ("completed", "estimated", 10, False), id="b86-floor-only"
        ),
    ],
)
def test_amounts(charge: TurnCharge, usage: UsageFigures | None, expected: tuple[object, ...]) -> None:
    """b47/b49: the specification also reports charged tokens (1050, 50); the contract's settlement
    event has no such field, so only the credits are asserted."""
    assert summary(completed(charge, usage)) == expected


def test_b44_b46_capped_turn_keeps_real_token_telemetry() -> None:
    charge = turn(10_000, reserved=2_500_000)
    result = completed(charge, UsageFigures(11_000, 500))
    assert (result.input_tokens, result.output_tokens) == (11_000, 500)
    deltas = dict(settlement_deltas(charge, result, POLICY))
    assert deltas[D_TOTAL] == QuotaRow(2_500_000, -2_500_000, 1, 11_000, 500)


def test_b48_settlement_is_deterministic() -> None:
    assert completed(turn(), None) == completed(turn(), None)
    assert settlement_deltas(turn(), completed(turn(), None), POLICY) == settlement_deltas(
        turn(), completed(turn(), None), POLICY
    )


def test_b50_released_returns_the_whole_reserve() -> None:
    charge = turn(reserved=4321)
    result = settle(charge, UsageFigures(10, 10), "failed", "context_length_exceeded", POLICY)
    assert summary(result) == ("failed", "released", 0, False)
    reserved = {key: QuotaRow(reserved_credits_micro=4321) for key in (D_TOTAL, M_TOTAL)}
    rows = apply_deltas(reserved, settlement_deltas(charge, result, POLICY))
    assert rows == {D_TOTAL: QuotaRow(calls=1), M_TOTAL: QuotaRow(calls=1)}


def test_b51_total_row_update() -> None:
    policy = make_policy(entry("ten", "standard", mult=10_000_000, default=True))
    charge = turn(2000, reserved=2000, model="ten")
    result = completed(charge, UsageFigures(100, 50), policy)
    assert result.committed_credits_micro == 1500
    reserved = {key: QuotaRow(reserved_credits_micro=2000) for key in (D_TOTAL, M_TOTAL)}
    rows = apply_deltas(reserved, settlement_deltas(charge, result, policy))
    assert rows[D_TOTAL] == rows[M_TOTAL] == QuotaRow(1500, 0, 1, 100, 50)


def test_b52_b54_premium_rows_get_credits_but_no_telemetry() -> None:
    charge = turn(5000, model="prem")
    result = completed(charge, UsageFigures(999, 999, web_search_calls=1))
    deltas = dict(settlement_deltas(charge, result, POLICY))
    assert list(deltas) == [D_PREM, D_TOTAL, M_PREM, M_TOTAL]
    assert deltas[D_PREM] == deltas[M_PREM] == QuotaRow(1998, -10_000, 1)
    assert deltas[D_TOTAL] == deltas[M_TOTAL] == QuotaRow(1998, -10_000, 1, 999, 999, 1)


@pytest.mark.parametrize(("web", "code"), [(2, 0), (0, 3), (0, 0)], ids=["b53-web", "b53-code", "b53-none"])
def test_b53_tool_calls_only_on_total(web: int, code: int) -> None:
    result = completed(
        turn(model="prem"), UsageFigures(10, 10, web_search_calls=web, code_interpreter_calls=code)
    )
    deltas = dict(settlement_deltas(turn(model="prem"), result, POLICY))
    assert (deltas[D_TOTAL].web_search_calls, deltas[D_TOTAL].code_interpreter_calls) == (web, code)
    assert (deltas[M_TOTAL].web_search_calls, deltas[M_TOTAL].code_interpreter_calls) == (web, code)
    assert (deltas[D_PREM].web_search_calls, deltas[D_PREM].code_interpreter_calls) == (0, 0)


@pytest.mark.parametrize(
    ("model", "usage", "keys"),
    [
        pytest.param(
            "prem", UsageFigures(300, 200), [D_PREM, D_TOTAL, M_PREM, M_TOTAL], id="b54-b55-premium-actual"
        ),
        pytest.param("std", UsageFigures(300, 200), [D_TOTAL, M_TOTAL], id="b54-b55-standard-actual"),
        pytest.param("prem", None, [D_PREM, D_TOTAL, M_PREM, M_TOTAL], id="b55-premium-estimated"),
    ],
)
def test_b54_b55_round_trip_leaves_no_reserve(
    model: str, usage: UsageFigures | None, keys: list[BucketKey]
) -> None:
    admitted = request(model=model)
    rows = apply_reserve({}, admitted.reserve_deltas)
    assert admitted.effective_model is not None and admitted.reserve_tokens is not None
    assert admitted.max_output_tokens is not None and admitted.reserved_credits_micro is not None
    charge = TurnCharge(
        admitted.effective_model,
        admitted.reserve_tokens,
        admitted.max_output_tokens,
        admitted.reserved_credits_micro,
        50,
        admitted.periods,
    )
    rows = apply_deltas(rows, settlement_deltas(charge, completed(charge, usage), POLICY))
    assert sorted(rows) == keys
    assert all(row.reserved_credits_micro == 0 and row.spent_credits_micro > 0 for row in rows.values())


def test_b56_forced_downgrade_is_priced_at_the_standard_model() -> None:
    policy = make_policy(
        entry("p3", "premium", mult=3_000_000, default=True),
        entry("s1", "standard", mult=1_000_000, default=True),
        kill_switches={"force_standard_tier": True},
    )
    admitted = request(policy, model="p3")
    assert (admitted.decision, admitted.effective_model) == ("downgrade", "s1")
    charge = turn(model="s1")
    result = completed(charge, UsageFigures(500, 200), policy)
    assert result.committed_credits_micro == 700
    assert [key for key, _ in settlement_deltas(charge, result, policy)] == [D_TOTAL, M_TOTAL]


def test_missing_model_in_snapshot_is_an_error() -> None:
    with pytest.raises(SettlementError, match="gone"):
        completed(turn(model="gone"), UsageFigures(1, 1))


@pytest.mark.parametrize(
    ("actual", "reserve", "tolerance", "over"),
    [
        pytest.param(1100, 1000, 1.10, False, id="at-tolerance"),
        pytest.param(1101, 1000, 1.10, True, id="over-tolerance"),
        pytest.param(115, 100, 1.15, False, id="exact-where-float-would-say-over"),
        pytest.param(1000, 1000, 1.0, False, id="tolerance-one"),
        pytest.param(1001, 1000, 1.0, True, id="tolerance-one-over"),
    ],
)
def test_overshoot_comparison_is_exact(actual: int, reserve: int, tolerance: float, over: bool) -> None:
    assert exceeds_tolerance(actual, reserve, tolerance) is over


# --- outcome and method by terminal event (docs/behaviours.md, billing derivation) ----------------

SOME = UsageFigures(10, 5)
ZERO = UsageFigures(0, 0)


@pytest.mark.parametrize(
    ("state", "code", "usage", "expected"),
    [
        pytest.param("completed", None, SOME, ("completed", "actual", False), id="b57-completed"),
        pytest.param("completed", None, None, ("completed", "estimated", False), id="b57-contract-no-usage"),
        pytest.param("cancelled", None, SOME, ("aborted", "actual", False), id="b58-cancelled-usage"),
        pytest.param("cancelled", None, None, ("aborted", "estimated", False), id="b58-cancelled-none"),
        pytest.param("cancelled", None, ZERO, ("aborted", "estimated", False), id="b58-cancelled-zeros"),
        pytest.param("failed", "orphan_timeout", SOME, ("aborted", "estimated", False), id="b59-orphan"),
        pytest.param(
            "failed", "context_length_exceeded", SOME, ("failed", "released", False), id="b60-context"
        ),
        pytest.param("failed", "validation_error", None, ("failed", "released", False), id="b60-validation"),
        pytest.param(
            "failed", "provider_not_called", None, ("failed", "released", False), id="released-not-called"
        ),
        pytest.param("failed", "provider_error", SOME, ("failed", "actual", False), id="b61-provider-error"),
        pytest.param("failed", "rate_limited", SOME, ("failed", "actual", False), id="b61-rate-limited"),
        pytest.param("failed", "provider_error", None, ("failed", "estimated", False), id="b61-no-usage"),
        pytest.param("failed", "provider_timeout", SOME, ("failed", "actual", False), id="provider-timeout"),
        pytest.param("failed", "web_search_calls_exceeded", SOME, ("failed", "actual", False), id="web-cap"),
        pytest.param(
            "failed", "code_interpreter_calls_exceeded", SOME, ("failed", "actual", False), id="code-cap"
        ),
        pytest.param(
            "failed", "message_persistence_failed", SOME, ("failed", "estimated", True), id="b62-unknown"
        ),
        pytest.param("failed", None, None, ("failed", "estimated", True), id="b62-null-code"),
    ],
)
def test_outcome_and_method(
    state: TerminalState, code: str | None, usage: UsageFigures | None, expected: tuple[object, ...]
) -> None:
    """b57: the specification calls a completed turn always `actual`; the contract's table settles a
    completed turn without usage (after the grace) as `estimated`. code-cap: the specification's code
    counts `code_interpreter_calls_exceeded` as unknown; the contract lists it with the usage codes."""
    result = settle(turn(), usage, state, code, POLICY)
    assert (result.outcome, result.method, result.unknown_error_code) == expected
    assert billing_rule(state, code).outcome == expected[0]


@pytest.mark.parametrize(
    ("state", "code", "usage", "waits"),
    [
        pytest.param("completed", None, None, True, id="completed-waits"),
        pytest.param("completed", None, SOME, False, id="completed-with-usage"),
        pytest.param("cancelled", None, ZERO, True, id="zero-usage-is-unknown"),
        pytest.param("failed", "provider_error", None, True, id="usage-code-waits"),
        pytest.param("failed", "orphan_timeout", None, False, id="orphan-immediately"),
        pytest.param("failed", "validation_error", None, False, id="released-immediately"),
        pytest.param("failed", "something_new", None, False, id="unknown-code-immediately"),
    ],
)
def test_awaits_usage(
    state: TerminalState, code: str | None, usage: UsageFigures | None, waits: bool
) -> None:
    assert awaits_usage(state, code, usage) is waits


def test_b87_reported_tool_calls_count_on_the_estimated_path() -> None:
    """The contract's orphan row ignores usage for pricing; tool calls that were reported still
    count on the `total` rows (they feed the daily tool quota)."""
    charge = turn(100, 4096, floor=10)
    result = settle(
        charge,
        UsageFigures(5, 5, web_search_calls=3, code_interpreter_calls=2),
        "failed",
        "orphan_timeout",
        POLICY,
    )
    assert summary(result) == ("aborted", "estimated", 10, False)
    deltas = dict(settlement_deltas(charge, result, POLICY))
    assert deltas[D_TOTAL] == QuotaRow(10, -10_000, 1, 0, 0, 3, 2)


# --- late usage (usage.adjusted) -------------------------------------------------------------------


def test_late_usage_reprices_an_estimated_settlement() -> None:
    charge = turn(2000, 1000, model="prem")
    estimated = completed(charge, None)
    assert estimated.committed_credits_micro == 1050
    adjusted = reprice(
        charge, estimated, UsageFigures(800, 200, web_search_calls=1), "completed", None, POLICY
    )
    assert adjusted is not None and summary(adjusted) == ("completed", "actual", 1000, False)
    deltas = dict(adjustment_deltas(charge, estimated, adjusted, POLICY))
    assert deltas[D_TOTAL] == deltas[M_TOTAL] == QuotaRow(-50, 0, 0, 800, 200, 1)
    assert deltas[D_PREM] == deltas[M_PREM] == QuotaRow(-50)
    rows: dict[BucketKey, QuotaRow] = {key: QuotaRow(reserved_credits_micro=10_000) for key in deltas}
    rows = apply_deltas(rows, settlement_deltas(charge, estimated, POLICY))
    rows = apply_deltas(rows, adjustment_deltas(charge, estimated, adjusted, POLICY))
    assert rows[D_TOTAL] == QuotaRow(1000, 0, 1, 800, 200, 1)


def test_late_usage_over_tolerance_is_capped() -> None:
    charge = turn(2000, 1000)
    adjusted = reprice(charge, completed(charge, None), UsageFigures(2000, 1000), "completed", None, POLICY)
    assert adjusted is not None and summary(adjusted) == ("completed", "actual", 10_000, True)


@pytest.mark.parametrize(
    ("state", "code", "previous", "usage"),
    [
        pytest.param("failed", "orphan_timeout", None, SOME, id="orphan-ignores-usage"),
        pytest.param("failed", "some_code", None, SOME, id="unknown-code-ignores-usage"),
        pytest.param("failed", "validation_error", None, SOME, id="released-stays-released"),
        pytest.param("completed", None, SOME, UsageFigures(20, 20), id="already-actual"),
        pytest.param("completed", None, None, ZERO, id="usage-still-unknown"),
    ],
)
def test_late_usage_changes_nothing(
    state: TerminalState, code: str | None, previous: UsageFigures | None, usage: UsageFigures
) -> None:
    first = settle(turn(), previous, state, code, POLICY)
    assert reprice(turn(), first, usage, state, code, POLICY) is None
