"""The settlement's quota statement: a step's deltas added to the users' quota rows in the one
global lock order, reporting the rows that may have crossed an alert threshold. Runs inside the
caller's transaction, as a part of `write_events`' combined statement."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from minichat.domain.quota import BucketKey, QuotaDelta
from minichat.domain.spend import ModelFigures
from minichat.storage.combined import Part
from minichat.storage.db import Unnest

_QUOTA_DELTAS = Unnest.of(
    "tenant_id uuid", "user_id uuid", "period_type text", "period_start date", "bucket text",
    "spent bigint", "reserved bigint", "calls bigint", "input_tokens bigint", "output_tokens bigint",
    "web_search_calls bigint", "code_interpreter_calls bigint", "at timestamptz", "alert_floor bigint",
    "by_model text",
)  # fmt: skip

# One statement: the rows are locked in the one global key order every quota writer uses (the
# materialised CTE, sorted before its FOR UPDATE), then updated. A row whose spend reaches its
# `alert_floor` (the least spend at which the batch may have crossed an alert threshold; NULL
# when it cannot) comes back with the thresholds its window has crossed already: only those rows
# cost a look at `quota_alerts`, and only they are returned.
_APPLY_QUOTA_DELTAS = f"""
WITH locked AS MATERIALIZED (
    SELECT q.id, k.spent, k.reserved, k.calls, k.input_tokens, k.output_tokens, k.web_search_calls,
           k.code_interpreter_calls, k.at, k.alert_floor, k.by_model::jsonb AS by_model
    FROM {_QUOTA_DELTAS.source}
    JOIN quota_usage q USING (tenant_id, user_id, period_type, period_start, bucket)
    ORDER BY q.tenant_id, q.user_id, q.period_type, q.period_start, q.bucket
    FOR UPDATE OF q
)
UPDATE quota_usage q SET
    spent_credits_micro = q.spent_credits_micro + k.spent,
    reserved_credits_micro = q.reserved_credits_micro + k.reserved,
    calls = q.calls + k.calls,
    input_tokens = q.input_tokens + k.input_tokens,
    output_tokens = q.output_tokens + k.output_tokens,
    web_search_calls = q.web_search_calls + k.web_search_calls,
    code_interpreter_calls = q.code_interpreter_calls + k.code_interpreter_calls,
    updated_at = GREATEST(q.updated_at, k.at),
    by_model = CASE WHEN k.by_model IS NULL THEN q.by_model ELSE q.by_model || (
        SELECT jsonb_object_agg(m.key, (
            SELECT jsonb_agg(COALESCE((q.by_model -> m.key ->> i)::bigint, 0) + (m.value ->> i)::bigint
                             ORDER BY i)
            FROM generate_series(0, 3) i))
        FROM jsonb_each(k.by_model) m) END
FROM locked k
WHERE q.id = k.id
RETURNING q.tenant_id, q.user_id, q.period_type, q.period_start, q.bucket, q.spent_credits_micro,
    CASE WHEN q.spent_credits_micro >= k.alert_floor THEN COALESCE(
        (SELECT string_agg(a.threshold_percent::text, ',') FROM quota_alerts a
         WHERE a.tenant_id = q.tenant_id AND a.user_id = q.user_id AND a.bucket = q.bucket
           AND a.period_type = q.period_type AND a.period_start = q.period_start), '') END AS crossed
"""
# `by_model` (daily `total` rows only, migration 0011): the batch's figures by model charged,
# [turns, input_tokens, output_tokens, charged_credits_micro], added to the row's own.
_QUOTA_REPORT = "crossed IS NOT NULL"
"""The rows `_APPLY_QUOTA_DELTAS` reports: those that reached their alert floor."""

QuotaSlot = tuple[UUID, UUID, BucketKey]


@dataclass(frozen=True, slots=True)
class AlertCandidate:
    """A row whose spend after the step reached its `alert_floor`: the spend and the thresholds
    its window had crossed before."""

    slot: QuotaSlot
    spent_credits_micro: int
    crossed: frozenset[int]


class MissingQuotaRow(RuntimeError):
    """A settlement names a row its reserve never created: a bug, never skipped silently."""


def _figures_json(figures: ModelFigures | None) -> str | None:
    return json.dumps(figures, separators=(",", ":")) if figures else None


def quota_deltas_part(
    deltas: dict[QuotaSlot, tuple[QuotaDelta, datetime]],
    floors: Mapping[QuotaSlot, int],
    by_model: Mapping[QuotaSlot, ModelFigures],
) -> Part | None:
    if not deltas:
        return None
    slots = sorted(deltas, key=lambda s: (s[0], s[1], s[2]))
    rows = []
    for slot in slots:
        tenant, user, key = slot
        d, at = deltas[slot]
        rows.append(
            (
                tenant, user, key.period_type, key.period_start, key.bucket,
                d.spent_credits_micro, d.reserved_credits_micro, d.calls, d.input_tokens,
                d.output_tokens, d.web_search_calls, d.code_interpreter_calls, at, floors.get(slot),
                _figures_json(by_model.get(slot)),
            )
        )  # fmt: skip
    return Part(_APPLY_QUOTA_DELTAS, _QUOTA_DELTAS.params(rows), _QUOTA_REPORT)


def alert_candidates(report: object) -> list[AlertCandidate]:
    if not report:
        return []
    assert isinstance(report, list)
    return [
        AlertCandidate(
            (tenant, user, BucketKey(period_type, period_start, bucket)),
            spent,
            frozenset(int(t) for t in crossed.split(",") if t),
        )
        for tenant, user, period_type, period_start, bucket, spent, crossed in report
    ]
