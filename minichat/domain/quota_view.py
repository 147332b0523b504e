"""A user's quota as the read API shows it: today's rows against the policy, and whether (and since
when) the default model's smallest request would be refused now. Pure: rows in, view out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from uuid import UUID

from minichat.domain.estimation import estimate_input, reserve_for
from minichat.domain.periods import Periods
from minichat.domain.quota import (
    BUCKET_PREMIUM,
    BUCKET_TOTAL,
    EMPTY_ROW,
    BucketKey,
    PeriodType,
    QuotaRow,
    limit_for,
)
from minichat.models.policy import CatalogModel, Policy


@dataclass(frozen=True, slots=True)
class StoredQuota:
    row: QuotaRow
    updated_at: datetime
    """Event time of the last change to the row."""
    thresholds_crossed: tuple[int, ...] = ()
    """The alert thresholds (percent) the row's window has crossed, ascending."""


@dataclass(frozen=True, slots=True)
class BucketView:
    bucket: str
    period_type: str
    period_start: str
    limit: int
    spent: int
    reserved: int
    thresholds_crossed: tuple[int, ...]
    """Alert thresholds (percent) already crossed in this window: each fired once."""

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)


@dataclass(frozen=True, slots=True)
class ToolView:
    tool: str
    calls_today: int
    daily_quota: int


@dataclass(frozen=True, slots=True)
class Blocked:
    bucket: str
    period_type: str
    period_start: str
    since: datetime
    """When the refusing row last changed: the change that left too little room."""
    smallest_request_credits_micro: int


@dataclass(frozen=True, slots=True)
class QuotaView:
    buckets: tuple[BucketView, ...]
    tools: tuple[ToolView, ...]
    blocked: Blocked | None


def smallest_request(policy: Policy, model: CatalogModel) -> int:
    """Credits the smallest possible request to `model` reserves: no content, no images, no tools,
    no previous turn (rule 5's fixed overhead and margin remain)."""
    estimate = estimate_input(
        policy.estimation,
        content_bytes=0,
        image_count=0,
        web_search=False,
        code_interpreter=False,
        previous_turn_tokens=0,
    )
    return reserve_for(estimate.input_tokens, model, policy).credits_micro


def default_model(policy: Policy) -> CatalogModel | None:
    """The model a new chat without `model` would get: the enabled standard default, else the
    enabled premium default."""
    for tier in ("standard", "premium"):
        for model in policy.models:
            if model.tier == tier and model.default and model.enabled:
                return model
    return None


def quota_view(
    policy: Policy, tenant_id: UUID, periods: Periods, stored: Mapping[BucketKey, StoredQuota]
) -> QuotaView:
    limits = policy.limits_for(tenant_id)
    keys = [
        BucketKey(period_type, start, bucket)
        for bucket in (BUCKET_TOTAL, BUCKET_PREMIUM)
        for period_type, start in _periods(periods)
    ]
    buckets = tuple(
        BucketView(
            bucket=key.bucket,
            period_type=key.period_type,
            period_start=key.period_start.isoformat(),
            limit=limit_for(limits, key),
            spent=(row := _row(stored, key)).spent_credits_micro,
            reserved=row.reserved_credits_micro,
            thresholds_crossed=found.thresholds_crossed if (found := stored.get(key)) else (),
        )
        for key in keys
    )
    today = _row(stored, BucketKey("daily", periods.daily, BUCKET_TOTAL))
    tools = (
        ToolView("web_search", today.web_search_calls, policy.tools.web_search_daily_quota),
        ToolView("code_interpreter", today.code_interpreter_calls, policy.tools.code_interpreter_daily_quota),
    )
    return QuotaView(buckets=buckets, tools=tools, blocked=_blocked(policy, buckets, stored, periods))


def _periods(periods: Periods) -> tuple[tuple[PeriodType, date], ...]:
    return (("daily", periods.daily), ("monthly", periods.monthly))


def _row(stored: Mapping[BucketKey, StoredQuota], key: BucketKey) -> QuotaRow:
    found = stored.get(key)
    return found.row if found is not None else EMPTY_ROW


def _blocked(
    policy: Policy,
    buckets: tuple[BucketView, ...],
    stored: Mapping[BucketKey, StoredQuota],
    periods: Periods,
) -> Blocked | None:
    model = default_model(policy)
    if model is None:
        return None
    need = smallest_request(policy, model)
    wanted = {BUCKET_TOTAL} if model.tier == "standard" else {BUCKET_TOTAL, BUCKET_PREMIUM}
    for view in buckets:  # daily before monthly, total before premium: the first refusal
        if view.bucket in wanted and view.spent + view.reserved + need > view.limit:
            period_type, start = next((t, d) for t, d in _periods(periods) if t == view.period_type)
            found = stored.get(BucketKey(period_type, start, view.bucket))
            # no row: the limit itself is too small, so it refuses since the period began
            since = found.updated_at if found is not None else datetime.combine(start, time(), UTC)
            return Blocked(view.bucket, view.period_type, view.period_start, since, need)
    return None
