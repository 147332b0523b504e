"""Quota periods: behaviour b89 (docs/behaviours.md)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from minichat.domain.periods import Periods, periods_for


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [
        pytest.param(
            datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC),
            Periods(date(2026, 2, 28), date(2026, 2, 1)),
            id="b89-last-second",
        ),
        pytest.param(
            datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC),
            Periods(date(2026, 3, 1), date(2026, 3, 1)),
            id="b89-first-second",
        ),
        pytest.param(
            datetime(2026, 3, 1, 1, 0, tzinfo=timezone(timedelta(hours=2))),
            Periods(date(2026, 2, 28), date(2026, 2, 1)),
            id="offset-converted-to-utc",
        ),
    ],
)
def test_periods_are_utc_day_and_month(event_time: datetime, expected: Periods) -> None:
    assert periods_for(event_time) == expected


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        periods_for(datetime(2026, 2, 28, 12, 0))
