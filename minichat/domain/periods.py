"""Quota periods (docs/contract.md, "Periods"): UTC day and month of the admitting command's event time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime


@dataclass(frozen=True, slots=True)
class Periods:
    """`period_start` of the daily and monthly quota rows of one turn; stored on the turn."""

    daily: date
    monthly: date


def periods_for(event_time: datetime) -> Periods:
    """The periods of an event time (the Kafka record timestamp). A naive datetime is refused."""
    if event_time.tzinfo is None or event_time.utcoffset() is None:
        raise ValueError("event_time must be timezone-aware")
    day = event_time.astimezone(UTC).date()
    return Periods(daily=day, monthly=day.replace(day=1))
