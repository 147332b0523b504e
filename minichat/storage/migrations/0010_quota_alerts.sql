-- minichat schema v10: budget alerts fire once per threshold and window (docs/contract.md,
-- "quota.threshold_crossed").
--
-- One row per (tenant, user, bucket, window, threshold) that settled spend has reached: the key
-- is what makes an alert fire once (a settlement inserts ON CONFLICT DO NOTHING and emits only
-- the rows it added), and the row keeps the event's fields, so a rebuild derives the same rows
-- and the read API lists the thresholds already crossed. Written in the settlement's
-- transaction, with the `quota.threshold_crossed` outbox row the relay publishes.
CREATE TABLE quota_alerts (
    tenant_id            uuid         NOT NULL,
    user_id              uuid         NOT NULL,
    bucket               varchar(32)  NOT NULL,
    period_type          varchar(16)  NOT NULL CHECK (period_type IN ('daily', 'monthly')),
    period_start         date         NOT NULL,
    threshold_percent    smallint     NOT NULL CHECK (threshold_percent BETWEEN 1 AND 100),
    event_id             uuid         NOT NULL,
    limit_credits_micro  bigint       NOT NULL CHECK (limit_credits_micro > 0),
    spent_credits_micro  bigint       NOT NULL CHECK (spent_credits_micro >= 0),
    request_id           uuid         NOT NULL,
    occurred_at          timestamptz  NOT NULL,
    PRIMARY KEY (tenant_id, user_id, bucket, period_type, period_start, threshold_percent)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON quota_alerts TO minichat_runtime;

ALTER TABLE quota_alerts ENABLE ROW LEVEL SECURITY;
GRANT SELECT ON quota_alerts TO minichat_reader;
CREATE POLICY tenant_read ON quota_alerts FOR SELECT TO minichat_reader
    USING (tenant_id = minichat_reader_tenant());
CREATE POLICY runtime_all ON quota_alerts TO minichat_runtime USING (true) WITH CHECK (true);
