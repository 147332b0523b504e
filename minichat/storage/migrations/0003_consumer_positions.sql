-- minichat schema v3: the input positions live with the state they produced.
--
-- One row per (consumer group, input topic, partition): the offset of the next record to apply.
-- The worker writes it in the same transaction as the records' effects and resumes from it after
-- any restart or rebalance, so Kafka's committed offsets (kept for monitoring) can never make it
-- skip a record. A missing row means nothing of that partition was applied yet.
--
-- Operator data, not tenant data: it names no tenant and the reader role gets no grant on it.
CREATE TABLE consumer_positions (
    group_id     text         NOT NULL,
    topic        text         NOT NULL,
    partition    integer      NOT NULL CHECK (partition >= 0),
    next_offset  bigint       NOT NULL CHECK (next_offset >= 0),
    updated_at   timestamptz  NOT NULL DEFAULT now(),  -- processing clock, for operators
    PRIMARY KEY (group_id, topic, partition)
);
