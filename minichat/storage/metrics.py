"""Gauges of the shared state for the `/metrics` page: operator-level, over all tenants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import asyncpg

SYSTEM_LEVEL: Final = "the /metrics gauges: counts over all tenants for the operator, no row leaves"

_STATE_GAUGES = """
SELECT
    (SELECT count(*) FROM parked_events) AS parked_events,
    (SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(parked_seen_at)), 0) FROM parked_events)
        AS parked_oldest_age_s,
    (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS outbox_unpublished,
    (SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(stored_seen_at)), 0) FROM outbox
     WHERE published_at IS NULL) AS outbox_oldest_age_s,
    (SELECT COALESCE(sum(reserved_credits_micro), 0) FROM quota_usage
     WHERE period_type = 'daily' AND bucket = 'total') AS reserved_credits_micro
"""


@dataclass(frozen=True, slots=True)
class StateGauges:
    """`reserved_credits_micro`: the daily `total` rows only. Every reserve is on `total`; a
    premium turn's second reserve (on `tier:premium`) would count it twice."""

    parked_events: int
    parked_oldest_age_s: float
    outbox_unpublished: int
    outbox_oldest_age_s: float
    reserved_credits_micro: int


async def state_gauges(con: asyncpg.Connection) -> StateGauges:
    row = await con.fetchrow(_STATE_GAUGES)
    assert row is not None
    return StateGauges(
        parked_events=row["parked_events"],
        parked_oldest_age_s=float(row["parked_oldest_age_s"]),
        outbox_unpublished=row["outbox_unpublished"],
        outbox_oldest_age_s=float(row["outbox_oldest_age_s"]),
        reserved_credits_micro=int(row["reserved_credits_micro"]),
    )
