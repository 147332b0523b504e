"""The read API's quota view (pure): rows against the policy, and why a user is blocked."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

from minichat.domain.periods import Periods
from minichat.domain.quota import BucketKey, QuotaRow
from minichat.domain.quota_view import StoredQuota, default_model, quota_view, smallest_request
from minichat.models.policy import load_policy
from minichat.settings import PACKAGED_POLICY

POLICY = load_policy(PACKAGED_POLICY)
PERIODS = Periods(daily=date(2026, 11, 29), monthly=date(2026, 11, 1))
TENANT = uuid.uuid4()
AT = datetime(2026, 11, 29, 9, 30, tzinfo=UTC)


def stored(period_type: str, spent: int, reserved: int = 0, web: int = 0) -> dict[BucketKey, StoredQuota]:
    start = PERIODS.daily if period_type == "daily" else PERIODS.monthly
    row = QuotaRow(spent_credits_micro=spent, reserved_credits_micro=reserved, web_search_calls=web)
    return {BucketKey(period_type, start, "total"): StoredQuota(row, AT)}  # type: ignore[arg-type]


def test_an_unused_user_has_full_limits_and_is_not_blocked() -> None:
    view = quota_view(POLICY, TENANT, PERIODS, {})
    daily = view.buckets[0]
    assert (daily.bucket, daily.period_type, daily.period_start) == ("total", "daily", "2026-11-29")
    assert daily.remaining == daily.limit == POLICY.limits.standard.daily
    assert view.blocked is None
    assert [(t.tool, t.calls_today) for t in view.tools] == [("web_search", 0), ("code_interpreter", 0)]


def test_blocked_when_the_smallest_request_no_longer_fits_and_since_the_rows_last_change() -> None:
    model = default_model(POLICY)
    assert model is not None
    need = smallest_request(POLICY, model)
    limit = POLICY.limits.standard.daily
    fits = quota_view(POLICY, TENANT, PERIODS, stored("daily", limit - need))
    assert fits.blocked is None  # inclusive: spent + reserved + need <= limit
    over = quota_view(POLICY, TENANT, PERIODS, stored("daily", limit - need, reserved=1, web=3))
    assert over.blocked is not None
    assert (over.blocked.bucket, over.blocked.period_type, over.blocked.since) == ("total", "daily", AT)
    assert over.blocked.smallest_request_credits_micro == need
    assert over.buckets[0].remaining == need - 1
    assert over.tools[0].calls_today == 3


def test_a_monthly_refusal_is_reported_when_the_day_still_has_room() -> None:
    monthly = quota_view(POLICY, TENANT, PERIODS, stored("monthly", POLICY.limits.standard.monthly))
    assert monthly.blocked is not None and monthly.blocked.period_type == "monthly"
