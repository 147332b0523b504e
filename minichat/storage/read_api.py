"""SQL of the read API (docs/contract.md, "Read API"). Every read runs in `reading_as`: a read-only
transaction as `minichat_reader` with the caller's tenant, so row-level security shows that tenant's
rows and no other's even if a query forgot its tenant filter (they all have one too)."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
async def reading_as(pool: asyncpg.Pool, tenant_id: UUID) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as con, con.transaction(readonly=True):
        await read_as_tenant(con, tenant_id)
        yield con


_LIVE_CHAT = """
SELECT EXISTS (SELECT FROM chats WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL)
"""

_MESSAGES = """
SELECT id, request_id, role, content, model, input_tokens, output_tokens, created_at
FROM messages
WHERE tenant_id = $1 AND chat_id = $2 AND deleted_at IS NULL
  AND ($3::timestamptz IS NULL OR (created_at, id) > ($3::timestamptz, $4::uuid))
ORDER BY created_at, id
LIMIT $5
"""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last message's (created_at, id), the order of the listing."""

    created_at: datetime
    message_id: UUID


async def chat_messages(
    con: asyncpg.Connection, tenant_id: UUID, chat_id: UUID, limit: int, after: Cursor | None
) -> tuple[list[dict[str, Any]], Cursor | None] | None:
    """A page of the chat's live messages and the cursor of the next one (None: last page);
    None when the chat is not this tenant's live chat."""
    if not await con.fetchval(_LIVE_CHAT, tenant_id, chat_id):
        return None
    rows = await con.fetch(
        _MESSAGES,
        tenant_id,
        chat_id,
        after.created_at if after else None,
        after.message_id if after else None,
        limit + 1,
    )
    page = [dict(r) for r in rows[:limit]]
    more = len(rows) > limit
    return page, Cursor(page[-1]["created_at"], page[-1]["id"]) if more else None


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
SELECT period_type, period_start, bucket, spent_credits_micro, reserved_credits_micro, calls,
       input_tokens, output_tokens, web_search_calls, code_interpreter_calls, updated_at
FROM quota_usage
WHERE tenant_id = $1 AND user_id = $2
  AND ((period_type = 'daily' AND period_start = $3) OR (period_type = 'monthly' AND period_start = $4))
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
        )
        for r in await con.fetch(_QUOTA_ROWS, tenant_id, user_id, daily, monthly)
    }
