-- minichat schema v8: the applied order is a fact (docs/architecture.md, "Determinism").
--
-- Each batch transaction adds, per partition set it applied records of, one row: the order in
-- which it applied them (an `order.applied` record, as JSON text, published as is). The outbox
-- relay publishes the rows to `order-log` (partition = set) in id order and deletes them once
-- acknowledged. A row is written after the batch's records were applied, under their locks: a
-- transaction re-applying the same records waits for the first to commit, so ids (and the
-- topic's order) follow commit order wherever two rows name the same records.
-- Operator data, no tenant: the rows name offsets, never content.
CREATE TABLE order_log (
    id              bigserial    PRIMARY KEY,
    partition_set   integer      NOT NULL CHECK (partition_set >= 0),
    payload         text         NOT NULL,
    stored_seen_at  timestamptz  NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, DELETE ON order_log TO minichat_runtime;
GRANT USAGE, SELECT ON SEQUENCE order_log_id_seq TO minichat_runtime;
