"""SQL of `minichat simulate`'s summary and of the quiescence checks (tools/summary/): counts of what
is left to do and the figures the summary reconciles, over the given tenants or all of them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import asyncpg

# `$1` is the tenants, or NULL for every tenant: one static statement either way.
_BACKLOG: Final = """
SELECT
  (SELECT count(*) FROM chat_turns
   WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[])) AND settled_at IS NULL) AS unsettled,
  (SELECT coalesce(sum(reserved_credits_micro), 0) FROM quota_usage
   WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[]))) AS reserved,
  (SELECT count(*) FROM outbox
   WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[])) AND published_at IS NULL) AS unpublished,
  (SELECT count(*) FROM parked_events
   WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[]))) AS parked
"""

_TURNS: Final = """
SELECT tenant_id, id, request_id, requester_user_id, state, billing_outcome,
       committed_credits_micro, settled_at IS NOT NULL AS settled,
       adjusted_at IS NOT NULL AS adjusted, period_daily, period_monthly,
       effective_model, settlement_method, input_tokens, output_tokens
FROM chat_turns WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[]))
"""

_DECISIONS: Final = """
SELECT command, decision, coalesce(error_code, '-') AS error_code, count(*) AS n
FROM turn_decisions WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[])) GROUP BY 1, 2, 3
"""

_QUOTA: Final = """
SELECT tenant_id, user_id, period_type, period_start, spent_credits_micro, reserved_credits_micro
FROM quota_usage WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[])) AND bucket = 'total'
"""

_ALERTS: Final = """
SELECT tenant_id, user_id, bucket, period_type, period_start, threshold_percent, event_id,
       limit_credits_micro, spent_credits_micro
FROM quota_alerts WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[]))
ORDER BY tenant_id, user_id, period_type, period_start, bucket, threshold_percent
"""


@dataclass(frozen=True)
class BacklogCounts:
    unsettled_turns: int
    reserved_credits_micro: int
    unpublished_outbox: int
    parked_events: int


@dataclass(frozen=True)
class SummaryRows:
    turns: list[asyncpg.Record]
    decisions: list[asyncpg.Record]
    quota: list[asyncpg.Record]
    backlog: BacklogCounts
    alerts: list[asyncpg.Record]


def _tenants(tenants: Collection[UUID] | None) -> list[UUID] | None:
    return None if tenants is None else list(tenants)


async def backlog_counts(con: asyncpg.Connection, tenants: Collection[UUID] | None) -> BacklogCounts:
    row = await con.fetchrow(_BACKLOG, _tenants(tenants))
    assert row is not None
    return BacklogCounts(
        unsettled_turns=int(row["unsettled"]),
        reserved_credits_micro=int(row["reserved"]),
        unpublished_outbox=int(row["unpublished"]),
        parked_events=int(row["parked"]),
    )


async def summary_rows(con: asyncpg.Connection, tenants: Collection[UUID] | None) -> SummaryRows:
    scope = _tenants(tenants)
    return SummaryRows(
        turns=await con.fetch(_TURNS, scope),
        decisions=await con.fetch(_DECISIONS, scope),
        quota=await con.fetch(_QUOTA, scope),
        backlog=await backlog_counts(con, tenants),
        alerts=await con.fetch(_ALERTS, scope),
    )
