-- minichat schema v6: when a billing event was stored, on the processing clock.
--
-- The relay reports the billing lag (stored -> acknowledged on billing-usage) from it. Like every
-- processing-clock column it ends in `_seen_at` and the digest leaves it out.
ALTER TABLE outbox ADD COLUMN stored_seen_at timestamptz NOT NULL DEFAULT now();
