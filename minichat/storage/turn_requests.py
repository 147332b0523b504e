"""SQL of the turn-requests agent: load a batch's state under the user locks, write its changes.

Every statement is set-based (`unnest` of column arrays) and carries the tenant. All functions run
inside the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from uuid import UUID

import asyncpg

from minichat.domain.admission import ChatFacts
from minichat.domain.commands import (
    BatchState,
    Changes,
    ChatView,
    Command,
    StoredTurn,
    UserKey,
    command_id_of,
)
from minichat.domain.ids import quota_row_id
from minichat.domain.periods import periods_for
from minichat.domain.quota import BUCKET_PREMIUM, BUCKET_TOTAL, BucketKey, QuotaRow
from minichat.models.events import TurnDelete, TurnEdit, TurnRequested, TurnRetry
from minichat.storage.db import RetryableConflict, columns

_NIL = UUID(int=0)

# -------------------------------------------------------------------------------------- loading

_LOAD_CHATS = """
SELECT c.id, c.tenant_id, c.tenant_id = k.tenant_id AS same_tenant, c.user_id, c.model,
       c.deleted_at IS NOT NULL AS deleted
FROM unnest($1::uuid[], $2::uuid[]) AS k (chat_id, tenant_id)
JOIN chats c ON c.id = k.chat_id
"""

# By the key alone, so that a key held by another tenant is seen (and that command treated as
# naming a hidden chat); only the caller's own tenant gets the payload.
_LOAD_DECISIONS = """
SELECT d.chat_id, d.command_id, d.tenant_id = k.tenant_id AS same_tenant,
       CASE WHEN d.tenant_id = k.tenant_id THEN d.payload END AS payload
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, command_id)
JOIN turn_decisions d ON d.chat_id = k.chat_id AND d.command_id = k.command_id
"""

_TURN_COLUMNS = """
t.chat_id, t.request_id, t.requester_user_id, t.state, t.deleted_at IS NOT NULL AS deleted,
t.image_count, t.web_search_enabled, t.code_interpreter_enabled,
CASE WHEN t.settled_at IS NULL THEN NULL
     WHEN t.usage_known THEN t.input_tokens + t.output_tokens
     ELSE 0 END AS settled_tokens
"""

# Per chat, a walk down `idx_chat_turns_chat_started` that stops at the first rows it needs: the
# cost follows the batch, not the size of `chat_turns` (a join of every turn of the batch's chats
# grew with each chat's history).
_LOAD_LATEST_LIVE = f"""
SELECT {_TURN_COLUMNS}, '' AS content
FROM unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, chat_id)
CROSS JOIN LATERAL (
    SELECT * FROM chat_turns c
    WHERE c.chat_id = k.chat_id AND c.tenant_id = k.tenant_id AND c.deleted_at IS NULL
    ORDER BY c.started_at DESC, c.id DESC
    LIMIT 1
) t
"""

_LOAD_SETTLED = f"""
SELECT {_TURN_COLUMNS}, '' AS content
FROM unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, chat_id)
CROSS JOIN LATERAL (
    SELECT * FROM chat_turns c
    WHERE c.chat_id = k.chat_id AND c.tenant_id = k.tenant_id
      AND c.deleted_at IS NULL AND c.settled_at IS NOT NULL
    ORDER BY c.started_at DESC, c.id DESC
    LIMIT 2
) t
ORDER BY t.chat_id, t.started_at DESC, t.id DESC
"""

# The mutation targets are locked first: the provider and usage agents lock a turn before its
# quota rows, so taking turns before user locks keeps one lock order everywhere.
_LOAD_TARGETS = f"""
SELECT {_TURN_COLUMNS}, COALESCE(m.content, '') AS content
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k (tenant_id, chat_id, request_id)
JOIN chat_turns t ON t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
LEFT JOIN LATERAL (
    SELECT content FROM messages m
    WHERE m.tenant_id = t.tenant_id AND m.chat_id = t.chat_id AND m.request_id = t.request_id
      AND m.role = 'user'
    ORDER BY m.deleted_at IS NULL DESC, m.created_at DESC
    LIMIT 1
) m ON true
ORDER BY t.id
FOR UPDATE OF t
"""

# Which of the batch's new turns have events waiting: keyed by the request (whoever parked them,
# as the drain that follows takes them).
_PARKED_REQUESTS = """
SELECT DISTINCT p.chat_id, p.request_id, p.tenant_id
FROM unnest($1::uuid[], $2::uuid[]) AS k (chat_id, request_id)
JOIN parked_events p ON p.chat_id = k.chat_id AND p.request_id = k.request_id
"""

# One user's check-and-reserve is atomic across partitions and workers: a transaction-scoped
# advisory lock per user, taken in one global order, then the user's existing rows locked too so
# that settlements (which update rows without the user lock) and admissions exclude each other.
_LOCK_USERS = """
SELECT pg_advisory_xact_lock(h)
FROM (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY h) AS keys
"""

_LOAD_QUOTA = """
SELECT q.tenant_id, q.user_id, q.period_type, q.period_start, q.bucket,
       q.spent_credits_micro, q.reserved_credits_micro, q.calls, q.input_tokens, q.output_tokens,
       q.web_search_calls, q.code_interpreter_calls
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::date[], $5::text[])
     AS k (tenant_id, user_id, period_type, period_start, bucket)
JOIN quota_usage q USING (tenant_id, user_id, period_type, period_start, bucket)
ORDER BY q.tenant_id, q.user_id, q.period_type, q.period_start, q.bucket
FOR UPDATE OF q
"""


def _stored_turn(row: asyncpg.Record) -> StoredTurn:
    return StoredTurn(
        request_id=row["request_id"],
        requester_user_id=row["requester_user_id"],
        state=row["state"],
        deleted=row["deleted"],
        content=row["content"],
        image_count=row["image_count"],
        web_search=row["web_search_enabled"],
        code_interpreter=row["code_interpreter_enabled"],
        settled_tokens=row["settled_tokens"],
    )


def _user_lock_key(user: UserKey) -> str:
    return f"quota:{user[0]}:{user[1]}"


async def lock_users(con: asyncpg.Connection, users: Iterable[UserKey]) -> None:
    """The users' quota locks for the transaction (re-taking a held one does not wait)."""
    keys = sorted({_user_lock_key(u) for u in users})
    if keys:
        await con.execute(_LOCK_USERS, keys)


async def load_batch_state(con: asyncpg.Connection, commands: Sequence[Command]) -> BatchState:
    """Everything `decide_batch` reads, with the batch's users locked for the transaction."""
    pairs = list({(e.tenant_id, e.chat_id) for e, _ in commands})
    tenants = [t for t, _ in pairs]
    chat_ids = [c for _, c in pairs]
    views: dict[UUID, ChatView] = {c: ChatView() for c in chat_ids}

    targets = sorted(
        {
            (e.tenant_id, e.chat_id, e.request_id)
            for e, _ in commands
            if isinstance(e, TurnRetry | TurnEdit | TurnDelete)
        }
    )
    if targets:
        for row in await con.fetch(_LOAD_TARGETS, *columns(targets, 3)):
            views[row["chat_id"]].targets[row["request_id"]] = _stored_turn(row)

    for row in await con.fetch(_LOAD_CHATS, chat_ids, tenants):
        view = views[row["id"]]
        if row["same_tenant"]:
            view.facts = ChatFacts(
                tenant_id=row["tenant_id"],
                owner_user_id=row["user_id"],
                model=row["model"],
                deleted=row["deleted"],
            )
        elif view.facts is None:
            # Another tenant's chat: only the fact that it is not the caller's is loaded.
            view.facts = ChatFacts(tenant_id=_NIL, owner_user_id=_NIL, model="", deleted=True)

    for row in await con.fetch(_LOAD_LATEST_LIVE, tenants, chat_ids):
        view = views[row["chat_id"]]
        view.latest_live = _stored_turn(row)
        view.running = row["state"] == "running"
    for row in await con.fetch(_LOAD_SETTLED, tenants, chat_ids):
        views[row["chat_id"]].settled.append(_stored_turn(row))

    decision_keys = list({(e.tenant_id, e.chat_id, command_id_of(e)) for e, _ in commands})
    decisions: dict[tuple[UUID, UUID], dict[str, object]] = {}
    foreign: set[tuple[UUID, UUID]] = set()
    for row in await con.fetch(_LOAD_DECISIONS, *columns(decision_keys, 3)):
        key = (row["chat_id"], row["command_id"])
        if row["same_tenant"]:
            decisions[key] = _payload(row["payload"])
        else:
            foreign.add(key)

    creating = list(
        {
            (e.chat_id, command_id_of(e))
            for e, _ in commands
            if isinstance(e, TurnRequested | TurnRetry | TurnEdit)
        }
    )
    parked = {
        (row["chat_id"], row["request_id"])
        for row in await con.fetch(_PARKED_REQUESTS, *columns(creating, 2))
    }

    quota = await _lock_quota(con, commands)
    return BatchState(
        chats=views, decisions=decisions, quota=quota, foreign_decisions=foreign, parked_requests=parked
    )


async def _lock_quota(
    con: asyncpg.Connection, commands: Sequence[Command]
) -> dict[UserKey, dict[BucketKey, QuotaRow]]:
    keys: set[tuple[UUID, UUID, str, object, str]] = set()
    users: set[UserKey] = set()
    for event, at in commands:
        if not isinstance(event, TurnRequested | TurnRetry | TurnEdit):
            continue
        users.add((event.tenant_id, event.user_id))
        periods = periods_for(at)
        for period_type, start in (("daily", periods.daily), ("monthly", periods.monthly)):
            for bucket in (BUCKET_TOTAL, BUCKET_PREMIUM):
                keys.add((event.tenant_id, event.user_id, period_type, start, bucket))
    quota: dict[UserKey, dict[BucketKey, QuotaRow]] = {user: {} for user in users}
    if not keys:
        return quota
    # The users' advisory locks are held already (processors.batches takes them for the batch).
    for row in await con.fetch(_LOAD_QUOTA, *columns(keys, 5)):  # locked in ORDER BY order
        quota[(row["tenant_id"], row["user_id"])][
            BucketKey(row["period_type"], row["period_start"], row["bucket"])
        ] = QuotaRow(
            spent_credits_micro=row["spent_credits_micro"],
            reserved_credits_micro=row["reserved_credits_micro"],
            calls=row["calls"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            web_search_calls=row["web_search_calls"],
            code_interpreter_calls=row["code_interpreter_calls"],
        )
    return quota


def _payload(value: object) -> dict[str, object]:
    if isinstance(value, str):  # a connection without the jsonb codec
        loaded = json.loads(value)
        assert isinstance(loaded, dict)
        return loaded
    assert isinstance(value, dict)
    return value


# -------------------------------------------------------------------------------------- writing

_INSERT_CHATS = """
INSERT INTO chats (id, tenant_id, user_id, model, title, created_at, updated_at)
SELECT id, tenant_id, user_id, model, title, created_at, created_at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
     AS k (id, tenant_id, user_id, model, title, created_at)
ON CONFLICT (id) DO NOTHING
"""

_REMOVE_TURNS = """
UPDATE chat_turns t
SET deleted_at = k.at, replaced_by_request_id = k.replaced_by, updated_at = GREATEST(t.updated_at, k.at)
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::timestamptz[])
     AS k (tenant_id, chat_id, request_id, replaced_by, at)
WHERE t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
  AND t.deleted_at IS NULL
"""

_REMOVE_MESSAGES = """
UPDATE messages m
SET deleted_at = k.at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[]) AS k (tenant_id, chat_id, request_id, at)
WHERE m.tenant_id = k.tenant_id AND m.chat_id = k.chat_id AND m.request_id = k.request_id
  AND m.deleted_at IS NULL
"""

_REMOVE_CHATS = """
UPDATE chats c
SET deleted_at = k.at, updated_at = GREATEST(c.updated_at, k.at)
FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS k (tenant_id, chat_id, at)
WHERE c.tenant_id = k.tenant_id AND c.id = k.chat_id AND c.deleted_at IS NULL
"""

_INSERT_TURNS = """
INSERT INTO chat_turns (
    id, tenant_id, chat_id, request_id, requester_type, requester_user_id, state,
    selected_model, effective_model, reserve_tokens, max_output_tokens_applied, reserved_credits_micro,
    policy_version_applied, minimal_generation_floor_applied, period_daily, period_monthly,
    web_search_enabled, code_interpreter_enabled, image_count,
    started_at, last_progress_at, updated_at)
SELECT id, tenant_id, chat_id, request_id, requester_type, requester_user_id, 'running',
    selected_model, effective_model, reserve_tokens, max_output_tokens_applied, reserved_credits_micro,
    policy_version_applied, minimal_generation_floor_applied, period_daily, period_monthly,
    web_search_enabled, code_interpreter_enabled, image_count,
    started_at, started_at, started_at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::uuid[],
            $7::text[], $8::text[], $9::bigint[], $10::int[], $11::bigint[],
            $12::bigint[], $13::int[], $14::date[], $15::date[],
            $16::bool[], $17::bool[], $18::int[], $19::timestamptz[])
     AS k (id, tenant_id, chat_id, request_id, requester_type, requester_user_id,
           selected_model, effective_model, reserve_tokens, max_output_tokens_applied, reserved_credits_micro,
           policy_version_applied, minimal_generation_floor_applied, period_daily, period_monthly,
           web_search_enabled, code_interpreter_enabled, image_count, started_at)
ON CONFLICT (chat_id, request_id) DO NOTHING
"""

_INSERT_USER_MESSAGES = """
INSERT INTO messages (id, tenant_id, chat_id, request_id, role, content, request_kind, created_at)
SELECT id, tenant_id, chat_id, request_id, 'user', content, 'chat', created_at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::timestamptz[])
     AS k (id, tenant_id, chat_id, request_id, content, created_at)
ON CONFLICT DO NOTHING
"""

_ADD_RESERVES = """
INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket,
                         reserved_credits_micro, updated_at)
SELECT id, tenant_id, user_id, period_type, period_start, bucket, amount, at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::date[], $6::text[], $7::bigint[],
            $8::timestamptz[])
     AS k (id, tenant_id, user_id, period_type, period_start, bucket, amount, at)
ON CONFLICT (tenant_id, user_id, period_type, period_start, bucket) DO UPDATE
SET reserved_credits_micro = quota_usage.reserved_credits_micro + EXCLUDED.reserved_credits_micro,
    updated_at = GREATEST(quota_usage.updated_at, EXCLUDED.updated_at)
"""

_INSERT_DECISIONS = """
INSERT INTO turn_decisions (tenant_id, chat_id, command_id, command, command_event_id, request_id,
                            decision, error_code, payload, decided_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::uuid[], $6::uuid[],
                     $7::text[], $8::text[], $9::jsonb[], $10::timestamptz[])
ON CONFLICT (chat_id, command_id) DO NOTHING
"""


class DecisionConflict(RetryableConflict):
    """A decision key was taken between loading and writing. Unreachable under the batch's request
    locks and the positions claim (test_overlapping_owners.py); retried, not fatal, if it ever is:
    the retry loads the stored decision and answers it as a replay."""


async def write_changes(con: asyncpg.Connection, changes: Changes) -> None:
    if changes.chats:
        await con.execute(
            _INSERT_CHATS,
            *columns(
                ((c.id, c.tenant_id, c.user_id, c.model, c.title, c.created_at) for c in changes.chats), 6
            ),
        )
    if changes.removed_turns:
        removed = changes.removed_turns
        await con.execute(
            _REMOVE_TURNS,
            *columns(
                ((r.tenant_id, r.chat_id, r.request_id, r.replaced_by_request_id, r.at) for r in removed), 5
            ),
        )
        await con.execute(
            _REMOVE_MESSAGES, *columns(((r.tenant_id, r.chat_id, r.request_id, r.at) for r in removed), 4)
        )
    if changes.removed_chats:
        await con.execute(
            _REMOVE_CHATS, *columns(((r.tenant_id, r.chat_id, r.at) for r in changes.removed_chats), 3)
        )
    if changes.turns:
        turns = changes.turns
        await con.execute(
            _INSERT_TURNS,
            *columns(
                (
                    (
                        t.id,
                        t.tenant_id,
                        t.chat_id,
                        t.request_id,
                        t.requester_type,
                        t.requester_user_id,
                        t.selected_model,
                        t.effective_model,
                        t.reserve_tokens,
                        t.max_output_tokens_applied,
                        t.reserved_credits_micro,
                        t.policy_version_applied,
                        t.minimal_generation_floor_applied,
                        t.period_daily,
                        t.period_monthly,
                        t.web_search_enabled,
                        t.code_interpreter_enabled,
                        t.image_count,
                        t.started_at,
                    )
                    for t in turns
                ),
                19,
            ),
        )
        await con.execute(
            _INSERT_USER_MESSAGES,
            *columns(
                (
                    (t.user_message_id, t.tenant_id, t.chat_id, t.request_id, t.content, t.started_at)
                    for t in turns
                ),
                6,
            ),
        )
    if changes.reserves:
        await con.execute(
            _ADD_RESERVES,
            *columns(
                (
                    (
                        quota_row_id(tenant, user, key),
                        tenant,
                        user,
                        key.period_type,
                        key.period_start,
                        key.bucket,
                        amount,
                        at,
                    )
                    for (tenant, user, key), (amount, at) in sorted(
                        changes.reserves.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])
                    )
                ),
                8,
            ),
        )
    if changes.decisions:
        status = await con.execute(
            _INSERT_DECISIONS,
            *columns(
                (
                    (
                        d.tenant_id,
                        d.chat_id,
                        d.command_id,
                        d.decision.command,
                        d.decision.command_event_id,
                        d.decision.request_id,
                        d.decision.decision,
                        d.decision.error_code,
                        d.payload,
                        d.decision.decided_at,
                    )
                    for d in changes.decisions
                ),
                10,
            ),
        )
        if int(status.split()[-1]) != len(changes.decisions):
            # The loaded state said these keys were free: a decision that cannot be stored would
            # let a redelivered command reserve again. Roll back and retry the batch instead.
            raise DecisionConflict(f"{len(changes.decisions)} decisions, {status.split()[-1]} stored")
