"""SQL of the provider-responses and usage agents: turns, assistant messages, settlements, parking.

All functions run inside the caller's transaction and carry the tenant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from uuid import UUID

import asyncpg

from minichat.domain.quota import QuotaDelta
from minichat.domain.settlement import USAGE_FIGURES, UsageFigures
from minichat.domain.spend import ModelFigures
from minichat.domain.turns import AssistantMessage, TurnRecord, turn_from_columns
from minichat.storage.combined import Part, execute_parts, execute_parts_reported
from minichat.storage.db import RetryableConflict, Unnest, columns
from minichat.storage.locks import RequestKey
from minichat.storage.outbox import OutboxEntry, outbox_part
from minichat.storage.quota_deltas import (
    AlertCandidate,
    MissingQuotaRow,
    QuotaSlot,
    alert_candidates,
    quota_deltas_part,
)

_LOAD_TURNS = """
SELECT t.*, k.tenant_id AS event_tenant, t.tenant_id = k.tenant_id AS same_tenant
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, request_id)
JOIN chat_turns t ON t.chat_id = k.chat_id AND t.request_id = k.request_id
ORDER BY t.id
FOR UPDATE OF t
"""

_LOAD_DECISION_TENANTS = """
SELECT d.chat_id, d.command_id, k.tenant_id AS event_tenant, d.tenant_id = k.tenant_id AS same_tenant
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, request_id)
JOIN turn_decisions d ON d.chat_id = k.chat_id AND d.command_id = k.request_id
"""


@dataclass(frozen=True, slots=True)
class Found:
    """What is stored for a request key, from the point of view of one event's tenant."""

    turn: TurnRecord | None
    same_tenant: bool


def _record(row: asyncpg.Record) -> TurnRecord:
    """A `chat_turns` row as the turn record: its columns are named as the record's fields."""
    usage = None
    if row["input_tokens"] is not None:
        usage = UsageFigures(*map(row.__getitem__, USAGE_FIGURES))
    return turn_from_columns(row, usage)


async def load_turns(
    con: asyncpg.Connection, keys: Iterable[tuple[UUID, UUID, UUID]]
) -> dict[tuple[UUID, RequestKey], Found]:
    """By (event tenant, (chat, request)): the turn when it is that tenant's, a mismatch flag when
    another tenant's turn or decision holds the key; absent when nothing is stored yet."""
    wanted = list(set(keys))  # locked in the statement's ORDER BY order
    found: dict[tuple[UUID, RequestKey], Found] = {}
    for row in await con.fetch(_LOAD_TURNS, *columns(wanted, 3)):
        same = row["same_tenant"]
        found[(row["event_tenant"], (row["chat_id"], row["request_id"]))] = Found(
            _record(row) if same else None, same
        )
    missing = [k for k in wanted if (k[0], (k[1], k[2])) not in found]
    if missing:
        for row in await con.fetch(_LOAD_DECISION_TENANTS, *columns(missing, 3)):
            # a decision without a turn: the command was rejected
            key = (row["chat_id"], row["command_id"])
            found[(row["event_tenant"], key)] = Found(None, row["same_tenant"])
    return found


# ------------------------------------------------------------------------------------ writing

_TURN_STATE = (
    "id uuid", "tenant_id uuid", "state text", "error_code text", "error_detail text", "finish_reason text",
    "provider_response_id text", "assistant_message_id uuid", "completed_at timestamptz",
    "updated_at timestamptz", "progress_seq bigint", "progress_offset bigint", "last_progress_at timestamptz",
    "usage_model text", "billing_outcome text", "settlement_method text", "committed_credits_micro bigint",
    "overshoot_capped bool", "settled_at timestamptz", "adjusted_at timestamptz",
)  # fmt: skip
"""The columns of a turn provider and usage events change, named as `TurnRecord` names them."""
_USAGE_FIGURES = tuple(f"{name} {'int' if name.endswith('_calls') else 'bigint'}" for name in USAGE_FIGURES)
"""A usage report's figures as `chat_turns` columns (tool calls are `int`; NULL while no report)."""
_TURN_UPDATES = Unnest.of(*_TURN_STATE, *_USAGE_FIGURES, "progressed bool", "awaiting_usage bool")
_turn_state = attrgetter(*(d.split()[0] for d in _TURN_STATE))
_reported_figures = attrgetter(*USAGE_FIGURES)
_NO_USAGE = (None,) * len(USAGE_FIGURES)

_UPDATE_TURNS = f"""
UPDATE chat_turns t SET
    state = k.state, error_code = k.error_code, error_detail = k.error_detail,
    finish_reason = k.finish_reason, provider_response_id = k.provider_response_id,
    assistant_message_id = k.assistant_message_id,
    completed_at = k.completed_at, terminal_at = k.completed_at, updated_at = k.updated_at,
    progress_seq = k.progress_seq, progress_offset = k.progress_offset, last_progress_at = k.last_progress_at,
    usage_known = COALESCE(k.input_tokens + k.output_tokens > 0, false),
    input_tokens = k.input_tokens, output_tokens = k.output_tokens,
    cache_read_input_tokens = k.cache_read_input_tokens,
    cache_write_input_tokens = k.cache_write_input_tokens,
    reasoning_tokens = k.reasoning_tokens, web_search_calls = k.web_search_calls,
    code_interpreter_calls = k.code_interpreter_calls, usage_model = k.usage_model,
    web_search_completed_count = COALESCE(k.web_search_calls, t.web_search_completed_count),
    code_interpreter_completed_count = COALESCE(k.code_interpreter_calls, t.code_interpreter_completed_count),
    billing_outcome = k.billing_outcome, settlement_method = k.settlement_method,
    committed_credits_micro = k.committed_credits_micro, overshoot_capped = k.overshoot_capped,
    settled_at = k.settled_at, adjusted_at = k.adjusted_at,
    last_progress_seen_at = CASE WHEN k.progressed THEN now() ELSE t.last_progress_seen_at END,
    terminal_seen_at = CASE WHEN k.awaiting_usage THEN now() ELSE t.terminal_seen_at END
FROM {_TURN_UPDATES.source}
WHERE t.id = k.id AND t.tenant_id = k.tenant_id
"""


@dataclass(frozen=True, slots=True)
class TurnWrite:
    turn: TurnRecord
    progressed: bool
    awaiting_usage: bool


def _update_turns(writes: Sequence[TurnWrite]) -> Part | None:
    if writes:
        rows = (
            (
                *_turn_state(w.turn),
                *(_reported_figures(w.turn.usage) if w.turn.usage else _NO_USAGE),
                w.progressed,
                w.awaiting_usage,
            )
            for w in writes
        )
        return Part(_UPDATE_TURNS, _TURN_UPDATES.params(rows))
    return None


_INSERT_ASSISTANT_MESSAGES = """
INSERT INTO messages (id, tenant_id, chat_id, request_id, role, content, provider_response_id,
                      request_kind, model, input_tokens, output_tokens, cache_read_input_tokens,
                      cache_write_input_tokens, reasoning_tokens, created_at)
SELECT id, tenant_id, chat_id, request_id, 'assistant', content, provider_response_id,
       'chat', model, input_tokens, output_tokens, cache_read, cache_write, reasoning, created_at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::text[],
            $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::timestamptz[])
     AS k (id, tenant_id, chat_id, request_id, content, provider_response_id, model,
           input_tokens, output_tokens, cache_read, cache_write, reasoning, created_at)
ON CONFLICT DO NOTHING
"""

_MESSAGE_USAGE = """
UPDATE messages m SET
    input_tokens = k.input_tokens, output_tokens = k.output_tokens,
    cache_read_input_tokens = k.cache_read, cache_write_input_tokens = k.cache_write,
    reasoning_tokens = k.reasoning
FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])
     AS k (id, tenant_id, input_tokens, output_tokens, cache_read, cache_write, reasoning)
WHERE m.id = k.id AND m.tenant_id = k.tenant_id
"""


def _usage_figures(usage: UsageFigures | None) -> tuple[int, int, int, int, int]:
    if usage is None:
        return (0, 0, 0, 0, 0)
    return (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_write_input_tokens,
        usage.reasoning_tokens,
    )


def _insert_assistant_messages(messages: Sequence[AssistantMessage]) -> Part | None:
    if messages:
        rows = [
            (
                m.id, m.tenant_id, m.chat_id, m.request_id, m.content, m.provider_response_id, m.model,
                *_usage_figures(m.usage), m.created_at,
            )
            for m in messages
        ]  # fmt: skip
        return Part(_INSERT_ASSISTANT_MESSAGES, columns(rows, 13))
    return None


def _update_message_usage(turns: Sequence[TurnRecord]) -> Part | None:
    rows = [
        (t.assistant_message_id, t.tenant_id, *_usage_figures(t.usage))
        for t in turns
        if t.assistant_message_id is not None
    ]
    return Part(_MESSAGE_USAGE, columns(rows, 7)) if rows else None


async def write_events(
    con: asyncpg.Connection,
    *,
    parked: Sequence[Parked],
    messages: Sequence[AssistantMessage],
    turns: Sequence[TurnWrite],
    message_usage: Sequence[TurnRecord],
    deltas: dict[QuotaSlot, tuple[QuotaDelta, datetime]],
    outbox: Sequence[OutboxEntry],
    alert_floors: Mapping[QuotaSlot, int] | None = None,
    by_model: Mapping[QuotaSlot, ModelFigures] | None = None,
) -> list[AlertCandidate]:
    """A provider/usage step's writes in one statement (`combined.execute_parts`): every part
    touches rows no other part does (a message inserted here takes its usage in the insert, a
    turn and a quota row are written once, as they end up). Returns the rows that reached their
    alert floor (`alert_floors`, the least spend after the step at which an alert may fire);
    `by_model` is the daily `total` rows' split by model charged (the spend report)."""
    quota = quota_deltas_part(deltas, alert_floors or {}, by_model or {})
    parts = [
        _park(parked),
        _insert_assistant_messages(messages),
        _update_turns(turns),
        _update_message_usage(message_usage),
        quota,
        outbox_part(outbox),
    ]
    sent = [p for p in parts if p is not None]
    counts, reports = await execute_parts_reported(con, sent)
    by_part = dict(zip(map(id, sent), zip(counts, reports, strict=True), strict=True))
    if quota is None:
        return []
    count, report = by_part[id(quota)]
    if count != len(deltas):
        raise MissingQuotaRow(f"settlement touched {count} of {len(deltas)} quota rows")
    return alert_candidates(report)


# ------------------------------------------------------------------------------- held turns

_ADMISSION = (
    "id uuid", "tenant_id uuid", "chat_id uuid", "request_id uuid", "requester_type text",
    "requester_user_id uuid", "selected_model text", "effective_model text", "reserve_tokens bigint",
    "max_output_tokens_applied int", "reserved_credits_micro bigint", "policy_version_applied bigint",
    "minimal_generation_floor_applied int", "period_daily date", "period_monthly date",
    "web_search_enabled bool", "code_interpreter_enabled bool", "image_count int", "started_at timestamptz",
)  # fmt: skip
"""A new turn's admission columns, named as `commands.NewTurn` names them."""
_LATER_STATE = _TURN_STATE[2:]  # without id and tenant_id, which the admission's columns carry
_HELD_TURNS = Unnest.of(*_ADMISSION, *_LATER_STATE, *_USAGE_FIGURES, "awaiting_usage bool")
_admission = attrgetter(*(d.split()[0] for d in _ADMISSION))
_later_state = attrgetter(*(d.split()[0] for d in _LATER_STATE))
_later_names = ", ".join(d.split()[0] for d in _LATER_STATE)

# A turn started and changed by one batch, inserted once as it ends up: the row `_INSERT_TURNS`
# (storage/turn_requests.py) inserts, with what `_UPDATE_TURNS` would then have written. The same
# `turn_seq` rule: no other turn of the chat is inserted in between (processors/held.py).
_INSERT_HELD_TURNS = f"""
INSERT INTO chat_turns ({", ".join(d.split()[0] for d in _ADMISSION)}, turn_seq, {_later_names},
                        terminal_at, usage_known, {", ".join(USAGE_FIGURES)},
                        web_search_completed_count, code_interpreter_completed_count, terminal_seen_at)
SELECT {", ".join("k." + d.split()[0] for d in _ADMISSION)},
       COALESCE(last.seq, 0) + row_number() OVER (PARTITION BY k.chat_id ORDER BY k.ord),
       {", ".join("k." + d.split()[0] for d in _LATER_STATE)},
       k.completed_at, COALESCE(k.input_tokens + k.output_tokens > 0, false),
       {", ".join("k." + name for name in USAGE_FIGURES)},
       COALESCE(k.web_search_calls, 0), COALESCE(k.code_interpreter_calls, 0),
       CASE WHEN k.awaiting_usage THEN now() END
FROM {_HELD_TURNS.numbered_source("ord")}
LEFT JOIN LATERAL (
    SELECT t.turn_seq AS seq FROM chat_turns t
    WHERE t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id
    ORDER BY t.turn_seq DESC
    LIMIT 1
) last ON true
WHERE NOT EXISTS (
    SELECT FROM chat_turns s
    WHERE s.tenant_id = k.tenant_id AND s.chat_id = k.chat_id AND s.request_id = k.request_id
)
ON CONFLICT (chat_id, request_id) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class HeldInsert:
    """A turn a batch started (`admission`: its `NewTurn`) as the batch's events left it."""

    admission: object
    turn: TurnRecord
    awaiting_usage: bool


class HeldTurnConflict(RetryableConflict):
    """A turn the batch started was stored already when its row was written: unreachable under the
    batch's request locks (the admission found no decision and no turn); retried, never skipped,
    since the batch's events were applied to the turn it started."""


async def write_held(
    con: asyncpg.Connection,
    *,
    inserts: Sequence[HeldInsert],
    updates: Sequence[TurnWrite],
    messages: Sequence[AssistantMessage],
    message_usage: Sequence[TurnRecord],
) -> None:
    """The turns a batch held (processors/held.py), in one statement: those it started inserted in
    their final state, those it loaded updated once; their assistant messages inserted (with the
    usage already reported), or given the usage reported for them."""
    insert = None
    if inserts:
        rows = (
            (
                *_admission(h.admission),
                *_later_state(h.turn),
                *(_reported_figures(h.turn.usage) if h.turn.usage else _NO_USAGE),
                h.awaiting_usage,
            )
            for h in inserts
        )
        insert = Part(_INSERT_HELD_TURNS, _HELD_TURNS.params(rows))
    parts = [
        _insert_assistant_messages(messages),
        insert,
        _update_turns(updates),
        _update_message_usage(message_usage),
    ]
    sent = [p for p in parts if p is not None]
    counts = dict(zip(map(id, sent), await execute_parts(con, sent), strict=True))
    if insert is not None and counts[id(insert)] != len(inserts):
        raise HeldTurnConflict(f"{len(inserts)} turns started, {counts[id(insert)]} inserted")


# ------------------------------------------------------------------------------------ parking

_PARK = """
INSERT INTO parked_events (tenant_id, chat_id, request_id, source_topic, source_partition, source_offset,
                           event_type, payload, record_timestamp)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::int[], $6::bigint[],
                     $7::text[], $8::bytea[], $9::timestamptz[])
ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING
"""

# Taken whatever tenant parked them (the key is the command's request): an event of another
# tenant than the command's is then dead-lettered as a tenant mismatch, never left parked.
_UNPARK = """
DELETE FROM parked_events p
USING (
    SELECT q.source_topic, q.source_partition, q.source_offset
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, request_id)
    JOIN parked_events q ON q.chat_id = k.chat_id AND q.request_id = k.request_id
    ORDER BY q.record_timestamp, q.source_topic, q.source_partition, q.source_offset
    LIMIT $4
) AS s
WHERE p.source_topic = s.source_topic AND p.source_partition = s.source_partition
  AND p.source_offset = s.source_offset
RETURNING p.tenant_id, p.chat_id, p.request_id, p.source_topic, p.source_partition, p.source_offset,
          p.payload, p.record_timestamp
"""


@dataclass(frozen=True, slots=True)
class Parked:
    tenant_id: UUID
    chat_id: UUID
    request_id: UUID
    source_topic: str
    partition: int
    offset: int
    event_type: str
    payload: bytes
    record_timestamp: datetime


def _park(parked: Sequence[Parked]) -> Part | None:
    if parked:
        rows = [
            (
                p.tenant_id, p.chat_id, p.request_id, p.source_topic, p.partition, p.offset, p.event_type,
                p.payload, p.record_timestamp,
            )
            for p in parked
        ]  # fmt: skip
        return Part(_PARK, columns(rows, 9))
    return None


UNPARK_MAX = 1000
"""Parked events taken back at once: a request a gateway flooded with early events is drained in
chunks of this size, in their original order, never all into memory at once."""


async def unpark(
    con: asyncpg.Connection, keys: Iterable[tuple[UUID, UUID, UUID]], limit: int = UNPARK_MAX
) -> list[Parked]:
    """Take the first `limit` parked events of these (tenant, chat, request) keys, in their
    original order (call again until fewer come back)."""
    wanted = sorted(set(keys))
    if not wanted:
        return []
    rows = await con.fetch(_UNPARK, *columns(wanted, 3), limit)
    parked = [
        Parked(
            tenant_id=r["tenant_id"],
            chat_id=r["chat_id"],
            request_id=r["request_id"],
            source_topic=r["source_topic"],
            partition=r["source_partition"],
            offset=r["source_offset"],
            event_type="",
            payload=bytes(r["payload"]),
            record_timestamp=r["record_timestamp"],
        )
        for r in rows
    ]
    parked.sort(key=lambda p: (p.record_timestamp, p.source_topic, p.partition, p.offset))
    return parked


_CHAT_OWNERS = """
SELECT c.id, c.tenant_id, c.user_id
FROM unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, chat_id)
JOIN chats c ON c.id = k.chat_id AND c.tenant_id = k.tenant_id
"""


async def chat_owners(
    con: asyncpg.Connection, chats: Iterable[tuple[UUID, UUID]]
) -> dict[UUID, tuple[UUID, UUID]]:
    """chat id → (tenant, owner) for the (tenant, chat) pairs that exist: whose quota rows a
    provider or usage event of that chat can settle."""
    pairs = list(set(chats))
    if not pairs:
        return {}
    rows = await con.fetch(_CHAT_OWNERS, *columns(pairs, 2))
    return {r["id"]: (r["tenant_id"], r["user_id"]) for r in rows}
