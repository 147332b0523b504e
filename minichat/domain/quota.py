"""Quota buckets, rows and the tier cascade (docs/contract.md, "Buckets" and
"Admission", rules 6 and 7)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Literal

from minichat.domain.estimation import Reserve, reserve_for
from minichat.domain.periods import Periods
from minichat.models.policy import CatalogModel, Policy, Tier, TierLimits

PeriodType = Literal["daily", "monthly"]
QuotaScope = Literal["tokens", "web_search", "code_interpreter"]
DowngradeReason = Literal[
    "model_disabled", "force_standard_tier", "disable_premium_tier", "premium_quota_exhausted"
]

BUCKET_TOTAL = "total"
BUCKET_PREMIUM = "tier:premium"


@dataclass(frozen=True, slots=True, order=True)
class BucketKey:
    """One `quota_usage` row of a user (the user is implied by the mapping that holds it)."""

    period_type: PeriodType
    period_start: date
    bucket: str


@dataclass(frozen=True, slots=True)
class QuotaRow:
    """The counters of one `quota_usage` row. Also the shape of a delta (fields may then be < 0)."""

    spent_credits_micro: int = 0
    reserved_credits_micro: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    web_search_calls: int = 0
    code_interpreter_calls: int = 0

    # Spelled out: these run for every reserve and settlement of a batch (the hot path).
    def __add__(self, other: QuotaRow) -> QuotaRow:
        return QuotaRow(
            self.spent_credits_micro + other.spent_credits_micro,
            self.reserved_credits_micro + other.reserved_credits_micro,
            self.calls + other.calls,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.web_search_calls + other.web_search_calls,
            self.code_interpreter_calls + other.code_interpreter_calls,
        )

    def __sub__(self, other: QuotaRow) -> QuotaRow:
        return QuotaRow(
            self.spent_credits_micro - other.spent_credits_micro,
            self.reserved_credits_micro - other.reserved_credits_micro,
            self.calls - other.calls,
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.web_search_calls - other.web_search_calls,
            self.code_interpreter_calls - other.code_interpreter_calls,
        )


def _values(row: QuotaRow) -> tuple[int, ...]:
    return (
        row.spent_credits_micro,
        row.reserved_credits_micro,
        row.calls,
        row.input_tokens,
        row.output_tokens,
        row.web_search_calls,
        row.code_interpreter_calls,
    )


QuotaDelta = QuotaRow
QuotaRows = Mapping[BucketKey, QuotaRow]
"""One user's rows; a missing key reads as a row of zeros."""
EMPTY_ROW = QuotaRow()


@dataclass(frozen=True, slots=True)
class TierChoice:
    """Outcome of the cascade: `model` is None when no tier is left (`quota_exceeded`, scope tokens)."""

    model: CatalogModel | None
    reason: DowngradeReason | None
    reserve: Reserve | None


def buckets_for(tier: Tier) -> tuple[str, ...]:
    return (BUCKET_TOTAL, BUCKET_PREMIUM) if tier == "premium" else (BUCKET_TOTAL,)


@lru_cache(maxsize=1024)
def bucket_keys(periods: Periods, tier: Tier) -> tuple[BucketKey, ...]:
    """The 2 (standard) or 4 (premium) rows a turn reserves and settles on, in lock order.
    Cached: every reserve and settlement asks, and a day has one answer per tier."""
    buckets = buckets_for(tier)
    daily = [BucketKey("daily", periods.daily, bucket) for bucket in buckets]
    monthly = [BucketKey("monthly", periods.monthly, bucket) for bucket in buckets]
    return tuple(sorted(daily + monthly))


def limit_for(limits: TierLimits, key: BucketKey) -> int:
    """`total` ← standard limits, `tier:premium` ← premium limits, any other bucket ← 0."""
    if key.bucket == BUCKET_TOTAL:
        tier_limits = limits.standard
    elif key.bucket == BUCKET_PREMIUM:
        tier_limits = limits.premium
    else:
        return 0
    return tier_limits.daily if key.period_type == "daily" else tier_limits.monthly


def tier_available(rows: QuotaRows, limits: TierLimits, keys: Iterable[BucketKey], reserve: int) -> bool:
    """For every row: `spent + reserved + reserve ≤ limit` (inclusive)."""
    for key in keys:
        row = rows.get(key, EMPTY_ROW)
        if row.spent_credits_micro + row.reserved_credits_micro + reserve > limit_for(limits, key):
            return False
    return True


def candidate_model(policy: Policy, tier: Tier, selected_model: str) -> CatalogModel | None:
    """The selected model if it is in `tier` and enabled, else the tier's enabled default, else its
    first enabled model in catalog order, else None (the tier is skipped)."""
    enabled = [m for m in policy.models if m.tier == tier and m.enabled]
    for model in enabled:
        if model.id == selected_model:
            return model
    for model in enabled:
        if model.default:
            return model
    return enabled[0] if enabled else None


def choose_tier(
    policy: Policy,
    selected_model: str,
    limits: TierLimits,
    rows: QuotaRows,
    periods: Periods,
    input_tokens: int,
) -> TierChoice:
    """Admission rule 6. The reserve is recomputed per tier with that tier's candidate model; the
    first recorded reason is kept."""
    selected = policy.model_by_id(selected_model)
    reason: DowngradeReason | None = None
    tiers: tuple[Tier, ...]
    if selected is None or not selected.enabled:
        tiers, reason = ("premium", "standard"), "model_disabled"
    elif selected.tier == "premium":
        tiers = ("premium", "standard")
    else:
        tiers = ("standard",)  # standard never escalates
    for tier in tiers:
        if tier == "premium":
            switches = policy.kill_switches
            if switches.force_standard_tier:
                reason = reason or "force_standard_tier"
                continue
            if switches.disable_premium_tier:
                reason = reason or "disable_premium_tier"
                continue
        model = candidate_model(policy, tier, selected_model)
        if model is not None:
            reserve = reserve_for(input_tokens, model, policy)
            if tier_available(rows, limits, bucket_keys(periods, tier), reserve.credits_micro):
                return TierChoice(model=model, reason=reason, reserve=reserve)
        if tier == "premium":
            reason = reason or "premium_quota_exhausted"
    return TierChoice(model=None, reason=reason, reserve=None)


def tool_quota_scope(
    policy: Policy, rows: QuotaRows, periods: Periods, *, web_search: bool, code_interpreter: bool
) -> QuotaScope | None:
    """Admission rule 7: the first tool asked for whose count on today's `total` row has reached
    its daily quota (web search before code interpreter), else None."""
    today = rows.get(BucketKey("daily", periods.daily, BUCKET_TOTAL), EMPTY_ROW)
    if web_search and today.web_search_calls >= policy.tools.web_search_daily_quota:
        return "web_search"
    if code_interpreter and today.code_interpreter_calls >= policy.tools.code_interpreter_daily_quota:
        return "code_interpreter"
    return None


def apply_deltas(
    rows: QuotaRows, deltas: Iterable[tuple[BucketKey, QuotaDelta]]
) -> dict[BucketKey, QuotaRow]:
    """A new mapping with each delta added to its row (a missing row starts at zeros). A counter
    below 0 is a bug and raises `ValueError`, as the table's CHECK would."""
    result = dict(rows)
    for key, delta in deltas:
        row = result.get(key, EMPTY_ROW) + delta
        if min(_values(row)) < 0:
            raise ValueError(f"quota counters of {key} would go below 0: {row}")
        result[key] = row
    return result


def apply_reserve(
    rows: QuotaRows, reserve_deltas: Iterable[tuple[BucketKey, int]]
) -> dict[BucketKey, QuotaRow]:
    """A new mapping with an accepted turn's reserve added, so the next command of the same user in
    the batch sees it."""
    return apply_deltas(
        rows, ((key, QuotaRow(reserved_credits_micro=amount)) for key, amount in reserve_deltas)
    )
