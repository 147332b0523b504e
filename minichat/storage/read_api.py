"""SQL of the read API (docs/contract.md, "Read API"). Every read runs in `reading_as`: a read-only
transaction as `minichat_reader` with the caller's tenant, so row-level security shows that tenant's
rows and no other's even if a query forgot its tenant filter (they all have one too)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

import asyncpg

from minichat.domain.quota import BucketKey, QuotaRow
from minichat.domain.quota_view import StoredQuota
from minichat.storage.readers import read_as_tenant


@asynccontextmanager
async def reading_as(
    pool: asyncpg.Pool, tenant_id: UUID, *, acquire_timeout: float | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """A read-only transaction as the tenant's reader; `acquire_timeout` bounds the wait for a
    connection (TimeoutError)."""
    async with pool.acquire(timeout=acquire_timeout) as con, con.transaction(readonly=True):
        await read_as_tenant(con, tenant_id)
        yield con


_LIVE_CHAT = """
SELECT EXISTS (SELECT FROM chats WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL)
"""

# Conversation order: turn by turn in the order the engine applied them (`turn_seq`, migration
# 0009; then the turn's start and request id, for rows written without a number), the user's
# message before the assistant's. No message time reorders a turn: the next question is often sent
# in the millisecond the answer was acknowledged, and the assistant's time is its completion's
# append time, on another partition, possibly of another broker's clock. A page is cut in SQL by
# `limit` and by the bytes its rows' JSON takes at least (`before` < $9): PostgreSQL never sends
# hundreds of big messages for most of them to be thrown away. Sizes come from `octet_length`
# (the stored size, read without decompressing); content is read for the rows kept.
_MESSAGES = """
WITH ordered AS (
    SELECT m.id, COALESCE(t.turn_seq, 0) AS turn_seq, COALESCE(t.started_at, m.created_at) AS turn_at,
           COALESCE(m.request_id, m.id) AS turn_key,
           CASE m.role WHEN 'user' THEN 0 WHEN 'assistant' THEN 1 ELSE 2 END AS rank,
           octet_length(m.content) + octet_length(COALESCE(m.model, '')) + $10 AS size
    FROM messages m
    LEFT JOIN chat_turns t ON t.tenant_id = m.tenant_id AND t.chat_id = m.chat_id
                          AND t.request_id = m.request_id
    WHERE m.tenant_id = $1 AND m.chat_id = $2 AND m.deleted_at IS NULL
), page AS (
    SELECT * FROM ordered
    WHERE $3::bigint IS NULL
       OR (turn_seq, turn_at, turn_key, rank, id)
          > ($3::bigint, $4::timestamptz, $5::uuid, $6::int, $7::uuid)
    ORDER BY turn_seq, turn_at, turn_key, rank, id
    LIMIT $8
), fitting AS (
    SELECT id, turn_seq, turn_at, turn_key, rank, count(*) OVER () AS page_rows,
           sum(size) OVER (ORDER BY turn_seq, turn_at, turn_key, rank, id ROWS UNBOUNDED PRECEDING)
               - size AS before
    FROM page
)
SELECT m.id, m.request_id, m.role, m.content, m.model, m.input_tokens, m.output_tokens, m.created_at,
       f.turn_seq, f.turn_at, f.turn_key, f.rank, f.page_rows
FROM fitting f
JOIN messages m ON m.tenant_id = $1 AND m.id = f.id
WHERE f.before < $9
ORDER BY f.turn_seq, f.turn_at, f.turn_key, f.rank, f.id
"""

_MESSAGE_COLUMNS = (
    "id",
    "request_id",
    "role",
    "content",
    "model",
    "input_tokens",
    "output_tokens",
    "created_at",
)
PREFETCH = 16
"""Rows of a page fetched per round trip: few round trips for small messages; big ones are few
anyway, as the SQL cuts a page by bytes."""
MESSAGE_JSON_MIN = 150
"""Bytes of a message's JSON besides its content and model, at least (a unit test holds it)."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last message's place in conversation order (its turn's number, start
    and request id, its role's rank, its id)."""

    turn_seq: int
    turn_at: datetime
    turn_key: UUID
    rank: int
    message_id: UUID


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One message of a page, where it sits, and how many rows the page's SQL window held (more
    rows than a page returns: there is a next page)."""

    fields: dict[str, Any]
    cursor: Cursor
    page_rows: int


async def chat_messages(
    con: asyncpg.Connection, tenant_id: UUID, chat_id: UUID, limit: int, after: Cursor | None, max_bytes: int
) -> AsyncGenerator[MessageRow, None] | None:
    """The next messages of the chat in conversation order, at most `limit + 1` of them and no
    more than fit `max_bytes` of JSON (always one), read `PREFETCH` at a time while the caller
    serialises them (inside the caller's transaction); None when the chat is not this tenant's
    live chat."""
    if not await con.fetchval(_LIVE_CHAT, tenant_id, chat_id):
        return None
    cursor = con.cursor(
        _MESSAGES,
        tenant_id,
        chat_id,
        after.turn_seq if after else None,
        after.turn_at if after else None,
        after.turn_key if after else None,
        after.rank if after else None,
        after.message_id if after else None,
        limit + 1,
        max_bytes,
        MESSAGE_JSON_MIN,
        prefetch=PREFETCH,
    )
    return _message_rows(cursor)


async def _message_rows(rows: AsyncIterable[asyncpg.Record]) -> AsyncGenerator[MessageRow, None]:
    async for r in rows:
        fields = {k: r[k] for k in _MESSAGE_COLUMNS}
        yield MessageRow(
            fields, Cursor(r["turn_seq"], r["turn_at"], r["turn_key"], r["rank"], r["id"]), r["page_rows"]
        )


_TURN = """
SELECT t.state, t.billing_outcome, t.settlement_method, t.committed_credits_micro, t.input_tokens,
       t.output_tokens, t.cache_read_input_tokens, t.cache_write_input_tokens, t.reasoning_tokens,
       t.web_search_calls, t.code_interpreter_calls, t.settled_at, d.payload AS decision
FROM chat_turns t
JOIN chats c ON c.tenant_id = t.tenant_id AND c.id = t.chat_id AND c.deleted_at IS NULL
LEFT JOIN turn_decisions d ON d.tenant_id = t.tenant_id AND d.chat_id = t.chat_id
                          AND d.command_id = t.request_id
WHERE t.tenant_id = $1 AND t.chat_id = $2 AND t.request_id = $3 AND t.deleted_at IS NULL
"""

_REJECTED = """
SELECT d.payload AS decision
FROM turn_decisions d
JOIN chats c ON c.tenant_id = d.tenant_id AND c.id = d.chat_id AND c.deleted_at IS NULL
WHERE d.tenant_id = $1 AND d.chat_id = $2 AND d.command_id = $3
"""


async def chat_turn(
    con: asyncpg.Connection, tenant_id: UUID, chat_id: UUID, request_id: UUID
) -> dict[str, Any] | None:
    """The turn of a request (or, for a refused request, only its decision); None when this
    tenant's live chat has neither."""
    row = await con.fetchrow(_TURN, tenant_id, chat_id, request_id)
    if row is not None:
        return dict(row)
    refused = await con.fetchrow(_REJECTED, tenant_id, chat_id, request_id)
    return {"state": None, "decision": refused["decision"]} if refused is not None else None


_KNOWN_USER = """
SELECT EXISTS (SELECT FROM chats WHERE tenant_id = $1 AND user_id = $2)
    OR EXISTS (SELECT FROM quota_usage WHERE tenant_id = $1 AND user_id = $2)
"""

_QUOTA_ROWS = """
SELECT q.period_type, q.period_start, q.bucket, q.spent_credits_micro, q.reserved_credits_micro, q.calls,
       q.input_tokens, q.output_tokens, q.web_search_calls, q.code_interpreter_calls, q.updated_at,
       ARRAY(SELECT a.threshold_percent::int FROM quota_alerts a
             WHERE a.tenant_id = q.tenant_id AND a.user_id = q.user_id AND a.bucket = q.bucket
               AND a.period_type = q.period_type AND a.period_start = q.period_start
             ORDER BY a.threshold_percent) AS thresholds_crossed
FROM quota_usage q
WHERE q.tenant_id = $1 AND q.user_id = $2
  AND ((q.period_type = 'daily' AND q.period_start = $3)
       OR (q.period_type = 'monthly' AND q.period_start = $4))
"""


async def user_quota(
    con: asyncpg.Connection, tenant_id: UUID, user_id: UUID, daily: date, monthly: date
) -> dict[BucketKey, StoredQuota] | None:
    """The user's rows of these periods; None when the tenant has never seen the user."""
    if not await con.fetchval(_KNOWN_USER, tenant_id, user_id):
        return None
    return {
        BucketKey(r["period_type"], r["period_start"], r["bucket"]): StoredQuota(
            QuotaRow(
                spent_credits_micro=r["spent_credits_micro"],
                reserved_credits_micro=r["reserved_credits_micro"],
                calls=r["calls"],
                input_tokens=r["input_tokens"],
                output_tokens=r["output_tokens"],
                web_search_calls=r["web_search_calls"],
                code_interpreter_calls=r["code_interpreter_calls"],
            ),
            r["updated_at"],
            tuple(r["thresholds_crossed"]),
        )
        for r in await con.fetch(_QUOTA_ROWS, tenant_id, user_id, daily, monthly)
    }


# The spend report (`GET /v1/usage`): a user's daily `total` quota row holds that day's settled
# turns (`calls`), priced tokens and charged credits, adjustments included, and `by_model` splits
# them by the model charged (migration 0011). A report reads one row per user and day, never the
# turns. `{where}` adds the user filter, `{keys}` the grouped columns (from `SPEND_COLUMNS` only).
_SPEND_DAYS = """
SELECT q.user_id, q.period_start AS day, q.calls AS turns, q.input_tokens, q.output_tokens,
       q.spent_credits_micro AS charged, q.by_model
FROM quota_usage q
WHERE q.tenant_id = $1 AND q.period_type = 'daily' AND q.bucket = 'total'
  AND q.period_start >= $2 AND q.period_start <= $3 AND q.calls > 0{where}
"""
_SPEND_TOTALS = f"""
WITH days AS ({_SPEND_DAYS})
SELECT {{keys}}, sum(turns)::bigint AS turns, sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens, sum(charged)::bigint AS charged_credits_micro
FROM days
GROUP BY {{keys}} HAVING sum(turns) > 0 ORDER BY {{order}} LIMIT $4
"""
_SPEND_BY_MODEL = f"""
WITH days AS ({_SPEND_DAYS})
SELECT {{keys}}, sum((f ->> 0)::bigint)::bigint AS turns, sum((f ->> 1)::bigint)::bigint AS input_tokens,
       sum((f ->> 2)::bigint)::bigint AS output_tokens,
       sum((f ->> 3)::bigint)::bigint AS charged_credits_micro
FROM days, jsonb_each(days.by_model) AS m (model, f)
GROUP BY {{keys}} HAVING sum((f ->> 0)::bigint) > 0 ORDER BY {{order}} LIMIT $4
"""
SPEND_COLUMNS = {"user": "user_id", "day": "day", "model": "model"}
"""The report's group keys and the column (and response field) each one is."""
_SPEND_ORDER = {"user": "user_id", "day": "day", "model": 'model COLLATE "C"'}
"""Sort expressions: model ids by their bytes, whatever the database's collation."""


def spend_sql(group_by: Sequence[str], one_user: bool) -> str:
    """The report's statement for `group_by` (keys of `SPEND_COLUMNS`): $1 tenant, $2..$3 the UTC
    days, $4 the row limit, $5 the user when `one_user`."""
    keys = ", ".join(SPEND_COLUMNS[k] for k in group_by)
    order = ", ".join(_SPEND_ORDER[k] for k in group_by)
    where = " AND q.user_id = $5" if one_user else ""
    template = _SPEND_BY_MODEL if "model" in group_by else _SPEND_TOTALS
    return template.format(where=where, keys=keys, order=order)


async def spend_rows(
    con: asyncpg.Connection,
    tenant_id: UUID,
    start: date,
    end: date,
    group_by: Sequence[str],
    user_id: UUID | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The report's rows of UTC days `start`..`end`, grouped and sorted by `group_by`, at most
    `limit` of them."""
    args: list[Any] = [tenant_id, start, end, limit]
    if user_id is not None:
        args.append(user_id)
    return [dict(r) for r in await con.fetch(spend_sql(group_by, user_id is not None), *args)]
