-- minichat schema v11: the spend report's model split rides on the quota rows (docs/contract.md,
-- "Read API", `GET /v1/usage`).
--
-- A user's daily `total` row already holds that day's settled turns (`calls`), priced tokens and
-- charged credits, adjustments included: the report by user and day reads those rows. `by_model`
-- splits the same figures by the model each turn was charged for:
--
--     {"<effective model>": [turns, input_tokens, output_tokens, charged_credits_micro], ...}
--
-- The settlement statement that already updates the row adds to it, so a turn writes no new row
-- and `chat_turns` gets no new index (its settlement update stays as it was). Only the daily
-- `total` rows carry it; the others keep '{}'.
ALTER TABLE quota_usage ADD COLUMN by_model jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Turns settled before this column existed, as the settlement would have added them: tokens only
-- when the turn was priced on its usage (`actual`), as on the row itself.
UPDATE quota_usage q
SET by_model = m.by_model
FROM (
    SELECT tenant_id, user_id, period_start, jsonb_object_agg(model, figures) AS by_model
    FROM (
        SELECT t.tenant_id, t.requester_user_id AS user_id, t.period_daily AS period_start,
               t.effective_model AS model,
               jsonb_build_array(
                   count(*),
                   sum(CASE WHEN t.settlement_method = 'actual' THEN t.input_tokens ELSE 0 END),
                   sum(CASE WHEN t.settlement_method = 'actual' THEN t.output_tokens ELSE 0 END),
                   sum(t.committed_credits_micro)) AS figures
        FROM chat_turns t
        WHERE t.settled_at IS NOT NULL AND t.requester_user_id IS NOT NULL
        GROUP BY 1, 2, 3, 4
    ) per_model
    GROUP BY 1, 2, 3
) m
WHERE q.tenant_id = m.tenant_id AND q.user_id = m.user_id AND q.period_type = 'daily'
  AND q.period_start = m.period_start AND q.bucket = 'total';

-- The report reads one tenant's daily `total` rows of a date range. The unique key leads with the
-- user, so without this a tenant's range would scan every row the tenant ever had. The indexed
-- columns never change after the row's insert (once per user and day, not per turn): updates of
-- the counters stay HOT-eligible.
CREATE INDEX idx_quota_usage_daily_total ON quota_usage (tenant_id, period_start)
    WHERE period_type = 'daily' AND bucket = 'total';
