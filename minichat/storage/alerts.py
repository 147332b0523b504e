"""`quota_alerts`: the thresholds each user's windows have crossed, and their events' outbox rows.

Written in the settlement's transaction, only when a settlement crossed a threshold (rare: a few
per user and window), so the hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from minichat.models.events import QuotaThresholdCrossed
from minichat.storage.db import columns


class AlertRow(NamedTuple):
    """One crossed threshold, as stored and as sent (`payload`: the event's JSON text)."""

    tenant_id: UUID
    user_id: UUID
    bucket: str
    period_type: str
    period_start: date
    threshold_percent: int
    event_id: UUID
    limit_credits_micro: int
    spent_credits_micro: int
    request_id: UUID
    occurred_at: datetime
    dedupe_key: str
    payload: str


def alert_row(event: QuotaThresholdCrossed) -> AlertRow:
    """An alert's row and outbox entry, from its event: what a settlement stores and a rebuild
    stores again from `quota-alerts` (the outbox's dedupe key: the event id's uuid5 name)."""
    e = event
    key = f"alert:{e.tenant_id}:{e.user_id}:{e.bucket}:{e.period_type}:{e.period_start}:{e.threshold_percent}"
    return AlertRow(
        e.tenant_id, e.user_id, e.bucket, e.period_type, e.period_start, e.threshold_percent,
        e.event_id, e.limit_credits_micro, e.spent_credits_micro, e.request_id, e.occurred_at,
        key, e.model_dump_json(),
    )  # fmt: skip


# The outbox takes a row only for an alert this statement added: a threshold already stored (a
# rebuild over the live database) sends nothing again. Outbox ids follow the given order.
_INSERT = """
WITH k AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::date[], $6::smallint[],
                         $7::uuid[], $8::bigint[], $9::bigint[], $10::uuid[], $11::timestamptz[],
                         $12::text[], $13::text[]) WITH ORDINALITY
        AS k (tenant_id, user_id, bucket, period_type, period_start, threshold_percent, event_id,
              limit_credits_micro, spent_credits_micro, request_id, occurred_at, dedupe_key, payload, n)
), added AS (
    INSERT INTO quota_alerts (tenant_id, user_id, bucket, period_type, period_start, threshold_percent,
                              event_id, limit_credits_micro, spent_credits_micro, request_id, occurred_at)
    SELECT tenant_id, user_id, bucket, period_type, period_start, threshold_percent, event_id,
           limit_credits_micro, spent_credits_micro, request_id, occurred_at
    FROM k
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, event_id
)
INSERT INTO outbox (tenant_id, dedupe_key, event_type, payload, created_at)
SELECT k.tenant_id, k.dedupe_key, 'quota.threshold_crossed', k.payload::jsonb, k.occurred_at
FROM k JOIN added a ON a.tenant_id = k.tenant_id AND a.event_id = k.event_id
ORDER BY k.n
ON CONFLICT (dedupe_key) DO NOTHING
"""


async def insert_alerts(con: asyncpg.Connection, rows: Sequence[AlertRow]) -> int:
    """Store crossed thresholds and their outbox rows (idempotent: a threshold already stored is
    left as it is, and adds no outbox row); returns how many were new. One row per key."""
    if not rows:
        return 0
    status = await con.execute(_INSERT, *columns(rows, 13))
    return int(status.rsplit(" ", 1)[-1])
