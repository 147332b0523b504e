"""Settlement of a terminal turn (docs/contract.md, "Settlement") and late-usage re-pricing.

A function of the turn's stored preflight values, its terminal event, the usage (if known) and the
policy snapshot of the version it was admitted under; never of the live policy or the clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal

from minichat.domain.credits import credits_micro
from minichat.domain.periods import Periods
from minichat.domain.quota import BUCKET_TOTAL, BucketKey, QuotaDelta, QuotaRow, bucket_keys
from minichat.models.events import BillingOutcome, SettlementMethod, TerminalState
from minichat.models.policy import CatalogModel, Policy

BillingPath = Literal["usage", "estimated", "released"]
"""`usage`: actual when usage is known, else estimated (after waiting for it)."""

ORPHAN_TIMEOUT = "orphan_timeout"
RELEASED_CODES = frozenset({"context_length_exceeded", "validation_error", "provider_not_called"})
USAGE_CODES = frozenset(
    {
        "provider_error",
        "provider_timeout",
        "rate_limited",
        "web_search_calls_exceeded",
        "code_interpreter_calls_exceeded",
    }
)


class SettlementError(ValueError):
    """The turn cannot be priced (its effective model is missing from its policy snapshot)."""


@dataclass(frozen=True, slots=True)
class UsageFigures:
    """The figures of a usage report that pricing reads (the wire `Usage` without its model)."""

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_calls: int = 0
    code_interpreter_calls: int = 0

    @property
    def known(self) -> bool:
        """Usage counts as known when `in + out > 0`; all zeros would make cancels free."""
        return self.input_tokens + self.output_tokens > 0


USAGE_FIGURES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageFigures))
"""The counts of a usage report, in `UsageFigures`' order, named as the wire's `Usage` and the
`chat_turns` columns name them."""


@dataclass(frozen=True, slots=True)
class TurnCharge:
    """The preflight values stored on the turn at admission."""

    effective_model: str
    reserve_tokens: int
    max_output_tokens_applied: int
    reserved_credits_micro: int
    minimal_generation_floor_applied: int
    periods: Periods


@dataclass(frozen=True, slots=True)
class BillingRule:
    outcome: BillingOutcome
    path: BillingPath
    unknown_error_code: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    outcome: BillingOutcome
    method: SettlementMethod
    committed_credits_micro: int
    overshoot_capped: bool = False
    input_tokens: int = 0
    """Tokens added to the `total` rows: the usage on the actual path, else 0."""
    output_tokens: int = 0
    web_search_calls: int = 0
    code_interpreter_calls: int = 0
    unknown_error_code: bool = False


def billing_rule(terminal_state: TerminalState, error_code: str | None) -> BillingRule:
    """The contract's settlement table, by terminal state and failure code."""
    if terminal_state == "completed":
        return BillingRule("completed", "usage")
    if terminal_state == "cancelled":
        return BillingRule("aborted", "usage")
    if error_code == ORPHAN_TIMEOUT:
        return BillingRule("aborted", "estimated")
    if error_code in RELEASED_CODES:
        return BillingRule("failed", "released")
    if error_code in USAGE_CODES:
        return BillingRule("failed", "usage")
    return BillingRule("failed", "estimated", unknown_error_code=True)


def awaits_usage(terminal_state: TerminalState, error_code: str | None, usage: UsageFigures | None) -> bool:
    """True when the turn must wait for usage (up to `usage_grace_s`) before it settles; False when
    it settles now (usage known, or a row of the table that ignores usage)."""
    return billing_rule(terminal_state, error_code).path == "usage" and not (
        usage is not None and usage.known
    )


@lru_cache(maxsize=64)
def tolerance_ratio(tolerance: float) -> tuple[int, int]:
    """(numerator, denominator) of the tolerance as the decimal written in the policy file
    (`1.10` → 11/10). Cached: a policy has one tolerance, and `Fraction` costs microseconds."""
    exact = Fraction(str(tolerance))
    return exact.numerator, exact.denominator


def exceeds_tolerance(actual_tokens: int, reserve_tokens: int, tolerance: float) -> bool:
    """`actual > reserve · tolerance`, exactly, in integers: the tolerance is taken as the decimal
    written in the policy file, so 1100 tokens on a 1000 reserve is not over a 1.10 tolerance."""
    numerator, denominator = tolerance_ratio(tolerance)
    return actual_tokens * denominator > reserve_tokens * numerator


def settle(
    turn: TurnCharge,
    usage: UsageFigures | None,
    terminal_state: TerminalState,
    error_code: str | None,
    policy: Policy,
) -> Settlement:
    """Price a terminal turn. Call it when `awaits_usage` is False or the usage grace has expired;
    `policy` is the snapshot of the turn's `policy_version_applied`."""
    rule = billing_rule(terminal_state, error_code)
    if rule.path == "released":
        # Nothing is charged, but tool calls that happened still count on the total rows.
        return Settlement(
            rule.outcome,
            "released",
            0,
            web_search_calls=usage.web_search_calls if usage else 0,
            code_interpreter_calls=usage.code_interpreter_calls if usage else 0,
            unknown_error_code=rule.unknown_error_code,
        )
    model = _model(turn, policy)
    if rule.path == "usage" and usage is not None and usage.known:
        return _actual(turn, usage, rule, model, policy)
    est_in = max(turn.reserve_tokens - turn.max_output_tokens_applied, 0)
    charge = credits_micro(
        est_in,
        turn.minimal_generation_floor_applied,
        model.input_tokens_credit_multiplier_micro,
        model.output_tokens_credit_multiplier_micro,
    )
    # Tool calls that happened are counted even when their tokens are not priced.
    return Settlement(
        rule.outcome,
        "estimated",
        charge,
        web_search_calls=usage.web_search_calls if usage else 0,
        code_interpreter_calls=usage.code_interpreter_calls if usage else 0,
        unknown_error_code=rule.unknown_error_code,
    )


def reprice(
    turn: TurnCharge,
    previous: Settlement,
    usage: UsageFigures,
    terminal_state: TerminalState,
    error_code: str | None,
    policy: Policy,
) -> Settlement | None:
    """Usage that arrives after an estimated settlement: the actual settlement that replaces it
    (`usage.adjusted`), or None when nothing changes (already actual or released, usage still
    unknown, or a table row that ignores usage: orphan timeout and unknown codes)."""
    rule = billing_rule(terminal_state, error_code)
    if previous.method != "estimated" or rule.path != "usage" or not usage.known:
        return None
    return _actual(turn, usage, rule, _model(turn, policy), policy)


def settlement_deltas(
    turn: TurnCharge, settlement: Settlement, policy: Policy
) -> tuple[tuple[BucketKey, QuotaDelta], ...]:
    """Each bucket row of the turn (2 or 4): reserved −= turn's reserve, spent += charge, calls += 1;
    the `total` rows also get the tokens and tool calls."""
    release = QuotaRow(reserved_credits_micro=-turn.reserved_credits_micro, calls=1)
    return tuple(
        (key, release + _contribution(settlement, key))
        for key in bucket_keys(turn.periods, _model(turn, policy).tier)
    )


def adjustment_deltas(
    turn: TurnCharge, previous: Settlement, adjusted: Settlement, policy: Policy
) -> tuple[tuple[BucketKey, QuotaDelta], ...]:
    """The row changes that turn `previous` into `adjusted` on the same rows (reserve and calls
    were settled already; spent may go down)."""
    return tuple(
        (key, _contribution(adjusted, key) - _contribution(previous, key))
        for key in bucket_keys(turn.periods, _model(turn, policy).tier)
    )


def _model(turn: TurnCharge, policy: Policy) -> CatalogModel:
    model = policy.model_by_id(turn.effective_model)
    if model is None:
        raise SettlementError(f"model {turn.effective_model!r} is not in policy version {policy.version}")
    return model


def _actual(
    turn: TurnCharge, usage: UsageFigures, rule: BillingRule, model: CatalogModel, policy: Policy
) -> Settlement:
    charge = credits_micro(
        usage.input_tokens,
        usage.output_tokens,
        model.input_tokens_credit_multiplier_micro,
        model.output_tokens_credit_multiplier_micro,
    )
    capped = exceeds_tolerance(
        usage.input_tokens + usage.output_tokens, turn.reserve_tokens, policy.overshoot_tolerance
    )
    return Settlement(
        rule.outcome,
        "actual",
        turn.reserved_credits_micro if capped else charge,
        overshoot_capped=capped,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        web_search_calls=usage.web_search_calls,
        code_interpreter_calls=usage.code_interpreter_calls,
        unknown_error_code=rule.unknown_error_code,
    )


def _contribution(settlement: Settlement, key: BucketKey) -> QuotaRow:
    """What a settlement adds to one row besides the reserve release and the call."""
    if key.bucket != BUCKET_TOTAL:
        return QuotaRow(spent_credits_micro=settlement.committed_credits_micro)
    return QuotaRow(
        spent_credits_micro=settlement.committed_credits_micro,
        input_tokens=settlement.input_tokens,
        output_tokens=settlement.output_tokens,
        web_search_calls=settlement.web_search_calls,
        code_interpreter_calls=settlement.code_interpreter_calls,
    )
