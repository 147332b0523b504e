"""SQL of the turn-requests agent: load a batch's state under the user locks, write its changes.

Every statement is set-based (`unnest` of column arrays) and carries the tenant. All functions run
inside the caller's transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg

from minichat.domain.admission import ChatFacts, StoredTurn
from minichat.domain.commands import (
    BatchState,
    Changes,
    ChatView,
    Command,
    StoredDecision,
    UserKey,
    command_id_of,
)
from minichat.domain.ids import quota_row_id
from minichat.domain.periods import periods_for
from minichat.domain.quota import BUCKET_PREMIUM, BUCKET_TOTAL, BucketKey, QuotaRow
from minichat.models.events import TurnDelete, TurnEdit, TurnRequested, TurnRetry
from minichat.storage.combined import Part, execute_parts
from minichat.storage.db import RetryableConflict, Unnest, columns

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

# Per chat, a walk down `idx_chat_turns_chat_seq` (the applied order, migration 0009; start time
# only breaks ties between rows written by other means) that stops at the first rows it needs: the
# cost follows the batch, not the size of `chat_turns` (a join of every turn of the batch's chats
# grew with each chat's history). The latest live turn and the latest two settled ones, in one
# round trip.
_LOAD_LATEST = f"""
SELECT t.kind, {_TURN_COLUMNS}, '' AS content
FROM unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, chat_id)
CROSS JOIN LATERAL (
    (SELECT 'live' AS kind, c.* FROM chat_turns c
     WHERE c.chat_id = k.chat_id AND c.tenant_id = k.tenant_id AND c.deleted_at IS NULL
     ORDER BY c.turn_seq DESC, c.started_at DESC, c.id DESC
     LIMIT 1)
    UNION ALL
    (SELECT 'settled' AS kind, c.* FROM chat_turns c
     WHERE c.chat_id = k.chat_id AND c.tenant_id = k.tenant_id
       AND c.deleted_at IS NULL AND c.settled_at IS NOT NULL
     ORDER BY c.turn_seq DESC, c.started_at DESC, c.id DESC
     LIMIT 2)
) t
ORDER BY t.chat_id, t.kind, t.turn_seq DESC, t.started_at DESC, t.id DESC
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

# Under the user locks (storage/locks.py), the user's existing rows are locked too, in the one
# global key order of every quota writer: whoever changes a row without the user lock still
# excludes an admission reading it.
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

# The six loads above as one statement: each a branch of one `UNION ALL`, its columns put in place
# of the union's (`part` says which load a row is of; the rest stay NULL). The branches run in
# order: the targets' turn locks first, the quota row locks last, as the statements did one by one.
_STATE_COLUMNS = (
    ("chat_id", "uuid"), ("request_id", "uuid"), ("tenant_id", "uuid"), ("user_id", "uuid"),
    ("same_tenant", "bool"), ("deleted", "bool"), ("model", "text"), ("requester_user_id", "uuid"),
    ("state", "text"), ("image_count", "int"), ("web_search_enabled", "bool"),
    ("code_interpreter_enabled", "bool"), ("settled_tokens", "bigint"), ("content", "text"),
    ("payload", "jsonb"), ("period_type", "text"), ("period_start", "date"), ("bucket", "text"),
    ("spent_credits_micro", "bigint"), ("reserved_credits_micro", "bigint"), ("calls", "int"),
    ("input_tokens", "bigint"), ("output_tokens", "bigint"), ("web_search_calls", "int"),
    ("code_interpreter_calls", "int"),
)  # fmt: skip
_TURN_FIELDS = (
    "chat_id", "request_id", "requester_user_id", "state", "deleted", "image_count", "web_search_enabled",
    "code_interpreter_enabled", "settled_tokens", "content",
)  # fmt: skip


def _branch(part: str, source: str, renamed: dict[str, str]) -> tuple[str, str]:
    """The select list (`part`, then the union's columns: `x.<renamed[column]>` or NULL) and the
    FROM of one load's branch."""
    values = ", ".join(
        f"{'x.' + renamed[name] if name in renamed else 'NULL'}::{pg_type} AS {name}"
        for name, pg_type in _STATE_COLUMNS
    )
    return f"{part}::text AS part, {values}", source


def _numbered(sql: str, offset: int) -> str:
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + offset}", sql.strip())


_LOAD_STATE = (
    f"WITH targets AS MATERIALIZED ({_numbered(_LOAD_TARGETS, 0)}),\n"
    f"quota AS MATERIALIZED ({_numbered(_LOAD_QUOTA, 12)})\n"
    + "\nUNION ALL\n".join(
        f"SELECT {values} FROM {source}"
        for values, source in (
            _branch("'target'", "targets x", {n: n for n in _TURN_FIELDS}),
            _branch(
                "'chat'",
                f"({_numbered(_LOAD_CHATS, 3)}) x",
                {
                    "chat_id": "id",
                    **{n: n for n in ("tenant_id", "same_tenant", "user_id", "model", "deleted")},
                },
            ),
            _branch("x.kind", f"({_numbered(_LOAD_LATEST, 5)}) x", {n: n for n in _TURN_FIELDS}),
            _branch(
                "'decision'",
                f"({_numbered(_LOAD_DECISIONS, 7)}) x",
                {
                    "chat_id": "chat_id",
                    "request_id": "command_id",
                    "same_tenant": "same_tenant",
                    "payload": "payload",
                },
            ),
            _branch(
                "'parked'",
                f"({_numbered(_PARKED_REQUESTS, 10)}) x",
                {n: n for n in ("chat_id", "request_id")},
            ),
            _branch(
                "'quota'",
                "quota x",
                {n: n for n, _ in _STATE_COLUMNS[15:]} | {"tenant_id": "tenant_id", "user_id": "user_id"},
            ),
        )
    )
)
"""Parameters: targets (3 arrays), chats (2), latest turns (2), decisions (3), parked (2), quota (5)."""


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


async def load_batch_state(con: asyncpg.Connection, commands: Sequence[Command]) -> BatchState:
    """Everything `decide_batch` reads, with the batch's users locked for the transaction: one
    statement (`_LOAD_STATE`), the turns it names locked before any quota row."""
    pairs = list({(e.tenant_id, e.chat_id) for e, _ in commands})
    views: dict[UUID, ChatView] = {chat: ChatView() for _, chat in pairs}
    tenants, chats = [t for t, _ in pairs], [c for _, c in pairs]
    quota_keys, users = _quota_keys(commands)
    rows = await con.fetch(
        _LOAD_STATE,
        *columns(_targets(commands), 3),
        chats,
        tenants,
        tenants,
        chats,
        *columns({(e.tenant_id, e.chat_id, command_id_of(e)) for e, _ in commands}, 3),
        *columns(_creating(commands), 2),
        *columns(quota_keys, 5),
    )
    decisions: dict[tuple[UUID, UUID], Mapping[str, Any] | bytes] = {}
    foreign: set[tuple[UUID, UUID]] = set()
    parked: set[tuple[UUID, UUID]] = set()
    quota: dict[UserKey, dict[BucketKey, QuotaRow]] = {user: {} for user in users}
    for row in rows:
        part = row["part"]
        if part == "chat":
            _chat_row(views[row["chat_id"]], row)
        elif part == "live":
            view = views[row["chat_id"]]
            view.latest_live = _stored_turn(row)
            view.running = row["state"] == "running"
        elif part == "settled":  # newest first
            views[row["chat_id"]].settled.append(_stored_turn(row))
        elif part == "target":
            views[row["chat_id"]].targets[row["request_id"]] = _stored_turn(row)
        elif part == "decision":
            key = (row["chat_id"], row["request_id"])
            if row["same_tenant"]:
                decisions[key] = _payload(row["payload"])
            else:
                foreign.add(key)
        elif part == "parked":
            parked.add((row["chat_id"], row["request_id"]))
        else:
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
    return BatchState(
        chats=views, decisions=decisions, quota=quota, foreign_decisions=foreign, parked_requests=parked
    )


def _targets(commands: Sequence[Command]) -> list[tuple[UUID, UUID, UUID]]:
    """The turns retry/edit/delete commands name (locked by the load)."""
    return sorted(
        {
            (e.tenant_id, e.chat_id, e.request_id)
            for e, _ in commands
            if isinstance(e, TurnRetry | TurnEdit | TurnDelete)
        }
    )


def _chat_row(view: ChatView, row: asyncpg.Record) -> None:
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


def _creating(commands: Sequence[Command]) -> set[tuple[UUID, UUID]]:
    """(chat, request) of the turns the commands may start: which have events parked."""
    return {
        (e.chat_id, command_id_of(e))
        for e, _ in commands
        if isinstance(e, TurnRequested | TurnRetry | TurnEdit)
    }


def _quota_keys(
    commands: Sequence[Command],
) -> tuple[set[tuple[UUID, UUID, str, object, str]], set[UserKey]]:
    """The quota rows the reserving commands read (locked by the load), and their users. The
    users' advisory locks are held already (processors.batches takes them for the batch)."""
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
    return keys, users


def _payload(value: object) -> dict[str, object]:
    if isinstance(value, str):  # a connection without the jsonb codec
        loaded = json.loads(value)
        assert isinstance(loaded, dict)
        return loaded
    assert isinstance(value, dict)
    return value


# -------------------------------------------------------------------------------------- writing

_CHATS = Unnest.of(
    "id uuid", "tenant_id uuid", "user_id uuid", "model text", "title text", "created_at timestamptz"
)
_INSERT_CHATS = f"""
INSERT INTO chats ({_CHATS.names}, updated_at)
SELECT {_CHATS.names}, created_at FROM {_CHATS.source}
ON CONFLICT (id) DO NOTHING
"""

_REMOVED_TURNS = Unnest.of(
    "tenant_id uuid", "chat_id uuid", "request_id uuid", "replaced_by_request_id uuid", "at timestamptz"
)
_REMOVE_TURNS = f"""
UPDATE chat_turns t
SET deleted_at = k.at, replaced_by_request_id = k.replaced_by_request_id,
    updated_at = GREATEST(t.updated_at, k.at)
FROM {_REMOVED_TURNS.source}
WHERE t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
  AND t.deleted_at IS NULL
"""
_REMOVE_MESSAGES = f"""
UPDATE messages m
SET deleted_at = k.at
FROM {_REMOVED_TURNS.source}
WHERE m.tenant_id = k.tenant_id AND m.chat_id = k.chat_id AND m.request_id = k.request_id
  AND m.deleted_at IS NULL
"""

_REMOVED_CHATS = Unnest.of("tenant_id uuid", "chat_id uuid", "at timestamptz")
_REMOVE_CHATS = f"""
UPDATE chats c
SET deleted_at = k.at, updated_at = GREATEST(c.updated_at, k.at)
FROM {_REMOVED_CHATS.source}
WHERE c.tenant_id = k.tenant_id AND c.id = k.chat_id AND c.deleted_at IS NULL
"""

# The admission's columns of a turn, named as `NewTurn` names them.
_TURNS = Unnest.of(
    "id uuid", "tenant_id uuid", "chat_id uuid", "request_id uuid", "requester_type text",
    "requester_user_id uuid", "selected_model text", "effective_model text", "reserve_tokens bigint",
    "max_output_tokens_applied int", "reserved_credits_micro bigint", "policy_version_applied bigint",
    "minimal_generation_floor_applied int", "period_daily date", "period_monthly date",
    "web_search_enabled bool", "code_interpreter_enabled bool", "image_count int", "started_at timestamptz",
)  # fmt: skip
# `turn_seq`: the chat's turns in the order they were applied (migration 0009), the read API's
# conversation order. The chat's highest number so far (`idx_chat_turns_chat_seq`), + 1 for each of
# the statement's new turns of the chat in batch order; a turn stored already takes no number, so
# a re-applied command leaves no gap and a rebuild numbers every chat as the live run did.
_INSERT_TURNS = f"""
INSERT INTO chat_turns ({_TURNS.names}, turn_seq, state, last_progress_at, updated_at)
SELECT {", ".join("k." + name for name, _ in _TURNS.declared)},
       COALESCE(last.seq, 0) + row_number() OVER (PARTITION BY k.chat_id ORDER BY k.ord),
       'running', k.started_at, k.started_at
FROM {_TURNS.numbered_source("ord")}
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

_USER_MESSAGES = Unnest.of(
    "user_message_id uuid", "tenant_id uuid", "chat_id uuid", "request_id uuid", "content text",
    "started_at timestamptz",
)  # fmt: skip
_INSERT_USER_MESSAGES = f"""
INSERT INTO messages (id, tenant_id, chat_id, request_id, role, content, request_kind, created_at)
SELECT user_message_id, tenant_id, chat_id, request_id, 'user', content, 'chat', started_at
FROM {_USER_MESSAGES.source}
ON CONFLICT DO NOTHING
"""

_RESERVES = Unnest.of(
    "id uuid", "tenant_id uuid", "user_id uuid", "period_type text", "period_start date", "bucket text",
    "amount bigint", "at timestamptz",
)  # fmt: skip
_ADD_RESERVES = f"""
INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket,
                         reserved_credits_micro, updated_at)
SELECT {_RESERVES.names} FROM {_RESERVES.source}
ON CONFLICT (tenant_id, user_id, period_type, period_start, bucket) DO UPDATE
SET reserved_credits_micro = quota_usage.reserved_credits_micro + EXCLUDED.reserved_credits_micro,
    updated_at = GREATEST(quota_usage.updated_at, EXCLUDED.updated_at)
"""

_DECISIONS = Unnest.of(
    "tenant_id uuid", "chat_id uuid", "command_id uuid", "command text", "command_event_id uuid",
    "request_id uuid", "decision text", "error_code text", "payload text", "decided_at timestamptz",
)  # fmt: skip
"""`payload` goes in as the decision's JSON text (pydantic-core's encoder, in Rust), cast to jsonb:
the pool's jsonb codec would run `json.dumps` on the dict in Python instead."""
_INSERT_DECISIONS = f"""
INSERT INTO turn_decisions ({_DECISIONS.names})
SELECT {_DECISIONS.selected(payload="jsonb")} FROM {_DECISIONS.source}
ON CONFLICT (chat_id, command_id) DO NOTHING
"""


class DecisionConflict(RetryableConflict):
    """A decision key was taken between loading and writing. Unreachable under the batch's request
    locks and the positions claim (test_overlapping_owners.py); retried, not fatal, if it ever is:
    the retry loads the stored decision and answers it as a replay."""


async def write_changes(con: asyncpg.Connection, changes: Changes, *, hold_turns: bool = False) -> None:
    """The batch's changes in one statement (`combined.execute_parts`), one part per table and
    kind. The parts run on one snapshot, as the removals did before the inserts of turns and
    messages (a removal never meets a row inserted in the same step); a chat inserted and deleted
    in the same step is inserted by a statement of its own first, so that the delete finds it.
    `hold_turns`: the new turns' rows are the caller's to insert (`turns.write_held`)."""
    first: list[Part] = []
    parts: list[Part] = []
    if changes.chats:
        insert = Part(_INSERT_CHATS, _CHATS.params_of(changes.chats))
        removed = {c.chat_id for c in changes.removed_chats}
        (first if removed & {c.id for c in changes.chats} else parts).append(insert)
    if changes.removed_turns:
        removed_turns = _REMOVED_TURNS.params_of(changes.removed_turns)
        parts += [Part(_REMOVE_TURNS, removed_turns), Part(_REMOVE_MESSAGES, removed_turns)]
    if changes.removed_chats:
        parts.append(Part(_REMOVE_CHATS, _REMOVED_CHATS.params_of(changes.removed_chats)))
    if changes.turns:
        if not hold_turns:
            parts.append(Part(_INSERT_TURNS, _TURNS.params_of(changes.turns)))
        parts.append(Part(_INSERT_USER_MESSAGES, _USER_MESSAGES.params_of(changes.turns)))
    if changes.reserves:
        parts.append(Part(_ADD_RESERVES, _RESERVES.params(_reserve_rows(changes))))
    decisions = None
    if changes.decisions:
        decisions = Part(_INSERT_DECISIONS, _DECISIONS.params(decision_rows(changes.decisions)))
        parts.append(decisions)
    if first:
        await execute_parts(con, first)
    stored = await execute_parts(con, parts)
    if decisions is not None and stored[-1] != len(changes.decisions):
        # The loaded state said these keys were free: a decision that cannot be stored would
        # let a redelivered command reserve again. Roll back and retry the batch instead.
        raise DecisionConflict(f"{len(changes.decisions)} decisions, {stored[-1]} stored")


def _reserve_rows(changes: Changes) -> Iterable[tuple[object, ...]]:
    """In the one key order every quota writer takes rows in."""
    for (tenant, user, key), (amount, at) in sorted(
        changes.reserves.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])
    ):
        row_id = quota_row_id(tenant, user, key)
        yield (row_id, tenant, user, key.period_type, key.period_start, key.bucket, amount, at)


def decision_rows(decisions: Sequence[StoredDecision]) -> Iterable[tuple[object, ...]]:
    """The `_DECISIONS` rows of a batch's decisions (the payload is their JSON, encoded once)."""
    return (
        (
            d.tenant_id, d.chat_id, d.command_id, d.command, d.command_event_id, d.request_id, d.decision,
            d.error_code, d.payload, d.decided_at,
        )
        for d in decisions
    )  # fmt: skip
