-- minichat schema v1: CONTRACT section 8.
-- Every table carries tenant_id and every query filters on it. Timestamps are event time
-- (Kafka record timestamps) unless the column name ends in _seen_at / _sent_at / published_at,
-- which are processing-clock bookkeeping for the watchdog and the relay (excluded from the digest).

CREATE TABLE policy_versions (
    -- Policy is operator config shared by all tenants; the nil tenant marks "all tenants".
    tenant_id   uuid        NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    version     bigint      NOT NULL CHECK (version >= 0),
    digest      text        NOT NULL,
    snapshot    jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

CREATE TABLE chats (
    id            uuid          PRIMARY KEY,
    tenant_id     uuid          NOT NULL,
    user_id       uuid          NOT NULL,
    model         varchar(1024) NOT NULL,
    title         varchar(255),
    is_temporary  boolean       NOT NULL DEFAULT false,
    created_at    timestamptz   NOT NULL,
    updated_at    timestamptz   NOT NULL,
    deleted_at    timestamptz
);
CREATE INDEX idx_chats_tenant_user_updated ON chats (tenant_id, user_id, updated_at DESC)
    WHERE deleted_at IS NULL;

CREATE TABLE messages (
    id                        uuid          PRIMARY KEY,
    tenant_id                 uuid          NOT NULL,
    chat_id                   uuid          NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    request_id                uuid,
    role                      varchar(16)   NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content                   text          NOT NULL DEFAULT '',
    content_type              varchar(32)   NOT NULL DEFAULT 'text',
    token_estimate            integer       NOT NULL DEFAULT 0 CHECK (token_estimate >= 0),
    provider_response_id      varchar(128),
    request_kind              varchar(16),
    features_used             jsonb         NOT NULL DEFAULT '[]',
    input_tokens              bigint        NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens             bigint        NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    cache_read_input_tokens   bigint        NOT NULL DEFAULT 0 CHECK (cache_read_input_tokens >= 0),
    cache_write_input_tokens  bigint        NOT NULL DEFAULT 0 CHECK (cache_write_input_tokens >= 0),
    reasoning_tokens          bigint        NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    model                     varchar(1024),
    is_compressed             boolean       NOT NULL DEFAULT false,
    created_at                timestamptz   NOT NULL,
    deleted_at                timestamptz,
    UNIQUE (id, chat_id)
);
CREATE UNIQUE INDEX idx_messages_chat_request_role ON messages (chat_id, request_id, role)
    WHERE request_id IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX idx_messages_chat_created ON messages (chat_id, created_at, id) WHERE deleted_at IS NULL;

CREATE TABLE chat_turns (
    id                                uuid          PRIMARY KEY,
    tenant_id                         uuid          NOT NULL,
    chat_id                           uuid          NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    request_id                        uuid          NOT NULL,
    requester_type                    varchar(16)   NOT NULL CHECK (requester_type IN ('user', 'system')),
    requester_user_id                 uuid,
    state                             varchar(16)   NOT NULL
        CHECK (state IN ('running', 'completed', 'failed', 'cancelled')),
    provider_name                     varchar(128),
    provider_response_id              varchar(128),
    assistant_message_id              uuid          REFERENCES messages (id) ON DELETE SET NULL,
    error_code                        varchar(64),
    error_detail                      text,
    finish_reason                     varchar(32),
    -- preflight (immutable after insert)
    selected_model                    varchar(1024) NOT NULL,
    effective_model                   varchar(1024) NOT NULL,
    reserve_tokens                    bigint        NOT NULL CHECK (reserve_tokens > 0),
    max_output_tokens_applied         integer       NOT NULL CHECK (max_output_tokens_applied >= 0),
    reserved_credits_micro            bigint        NOT NULL CHECK (reserved_credits_micro >= 0),
    policy_version_applied            bigint        NOT NULL,
    minimal_generation_floor_applied  integer       NOT NULL CHECK (minimal_generation_floor_applied >= 0),
    period_daily                      date          NOT NULL,
    period_monthly                    date          NOT NULL,
    web_search_enabled                boolean       NOT NULL DEFAULT false,
    code_interpreter_enabled          boolean       NOT NULL DEFAULT false,
    image_count                       integer       NOT NULL DEFAULT 0 CHECK (image_count >= 0),
    web_search_completed_count        integer       NOT NULL DEFAULT 0 CHECK (web_search_completed_count >= 0),
    code_interpreter_completed_count  integer       NOT NULL DEFAULT 0
        CHECK (code_interpreter_completed_count >= 0),
    -- lifecycle (event time)
    deleted_at                        timestamptz,
    replaced_by_request_id            uuid,
    started_at                        timestamptz   NOT NULL,
    last_progress_at                  timestamptz,
    completed_at                      timestamptz,
    terminal_at                       timestamptz,
    updated_at                        timestamptz   NOT NULL,
    progress_seq                      bigint        NOT NULL DEFAULT 0 CHECK (progress_seq >= 0),
    -- offset of the last turn.progress applied (a chat lives on one partition): replays are no-ops
    progress_offset                   bigint        NOT NULL DEFAULT -1,
    -- usage, as reported (first report wins; input_tokens IS NULL until a report arrived)
    usage_known                       boolean       NOT NULL DEFAULT false,
    input_tokens                      bigint        CHECK (input_tokens >= 0),
    output_tokens                     bigint        CHECK (output_tokens >= 0),
    cache_read_input_tokens           bigint        CHECK (cache_read_input_tokens >= 0),
    cache_write_input_tokens          bigint        CHECK (cache_write_input_tokens >= 0),
    reasoning_tokens                  bigint        CHECK (reasoning_tokens >= 0),
    web_search_calls                  integer       CHECK (web_search_calls >= 0),
    code_interpreter_calls            integer       CHECK (code_interpreter_calls >= 0),
    usage_model                       varchar(1024),
    -- settlement (exactly once: settled_at IS NULL guards it)
    billing_outcome                   varchar(16)   CHECK (billing_outcome IN ('completed', 'failed', 'aborted')),
    settlement_method                 varchar(16)   CHECK (settlement_method IN ('actual', 'estimated', 'released')),
    committed_credits_micro           bigint        CHECK (committed_credits_micro >= 0),
    overshoot_capped                  boolean,
    settled_at                        timestamptz,
    adjusted_at                       timestamptz,
    -- processing clock, watchdog only (excluded from the digest)
    last_progress_seen_at             timestamptz   NOT NULL DEFAULT now(),
    terminal_seen_at                  timestamptz,
    orphan_sent_at                    timestamptz,
    grace_sent_at                     timestamptz,
    UNIQUE (chat_id, request_id),
    CHECK ((state = 'running') = (completed_at IS NULL)),
    CHECK (settled_at IS NULL OR state <> 'running')
);
CREATE UNIQUE INDEX idx_chat_turns_running ON chat_turns (chat_id)
    WHERE state = 'running' AND deleted_at IS NULL;
CREATE INDEX idx_chat_turns_chat_started ON chat_turns (chat_id, started_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX idx_chat_turns_orphan_scan ON chat_turns (last_progress_seen_at)
    WHERE state = 'running';
CREATE INDEX idx_chat_turns_awaiting_usage ON chat_turns (terminal_seen_at)
    WHERE state <> 'running' AND settled_at IS NULL;

CREATE TABLE quota_usage (
    id                       uuid          PRIMARY KEY,
    tenant_id                uuid          NOT NULL,
    user_id                  uuid          NOT NULL,
    period_type              varchar(16)   NOT NULL CHECK (period_type IN ('daily', 'monthly')),
    period_start             date          NOT NULL,
    bucket                   varchar(32)   NOT NULL,
    spent_credits_micro      bigint        NOT NULL DEFAULT 0 CHECK (spent_credits_micro >= 0),
    reserved_credits_micro   bigint        NOT NULL DEFAULT 0 CHECK (reserved_credits_micro >= 0),
    calls                    integer       NOT NULL DEFAULT 0 CHECK (calls >= 0),
    input_tokens             bigint        NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens            bigint        NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    file_search_calls        integer       NOT NULL DEFAULT 0 CHECK (file_search_calls >= 0),
    web_search_calls         integer       NOT NULL DEFAULT 0 CHECK (web_search_calls >= 0),
    code_interpreter_calls   integer       NOT NULL DEFAULT 0 CHECK (code_interpreter_calls >= 0),
    rag_retrieval_calls      integer       NOT NULL DEFAULT 0 CHECK (rag_retrieval_calls >= 0),
    image_inputs             integer       NOT NULL DEFAULT 0 CHECK (image_inputs >= 0),
    image_upload_bytes       bigint        NOT NULL DEFAULT 0 CHECK (image_upload_bytes >= 0),
    -- the latest event time that changed the row (GREATEST keeps it order-independent)
    updated_at               timestamptz   NOT NULL,
    UNIQUE (tenant_id, user_id, period_type, period_start, bucket)
);

CREATE TABLE turn_decisions (
    tenant_id         uuid         NOT NULL,
    chat_id           uuid         NOT NULL,
    -- request_id (turn.requested), new_request_id (retry/edit), event_id (turn.delete/chat.delete)
    command_id        uuid         NOT NULL,
    command           varchar(32)  NOT NULL,
    command_event_id  uuid         NOT NULL,
    request_id        uuid,
    decision          varchar(16)  NOT NULL CHECK (decision IN ('allow', 'downgrade', 'reject', 'done')),
    error_code        varchar(64),
    payload           jsonb        NOT NULL,
    decided_at        timestamptz  NOT NULL,
    PRIMARY KEY (chat_id, command_id)
);
CREATE INDEX idx_turn_decisions_tenant ON turn_decisions (tenant_id, chat_id);

CREATE TABLE outbox (
    id            bigserial    PRIMARY KEY,
    tenant_id     uuid         NOT NULL,
    dedupe_key    text         NOT NULL UNIQUE,
    event_type    varchar(32)  NOT NULL,
    payload       jsonb        NOT NULL,
    created_at    timestamptz  NOT NULL,
    published_at  timestamptz
);
CREATE INDEX idx_outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Provider and usage events that arrived before their command was decided (section 7).
CREATE TABLE parked_events (
    tenant_id         uuid         NOT NULL,
    chat_id           uuid         NOT NULL,
    request_id        uuid         NOT NULL,
    source_topic      text         NOT NULL,
    source_partition  integer      NOT NULL,
    source_offset     bigint       NOT NULL,
    event_type        varchar(32)  NOT NULL,
    payload           bytea        NOT NULL,
    record_timestamp  timestamptz  NOT NULL,
    parked_seen_at    timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
CREATE INDEX idx_parked_events_turn ON parked_events (chat_id, request_id);
