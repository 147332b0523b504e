"""The read API on the worker's web port (docs/contract.md, "Read API"): health, readiness, a chat's
messages, a turn, a user's quota. `/v1/` routes need a bearer token of one tenant; reads run as
`minichat_reader` with that tenant (row-level security), so another tenant's chat, turn or user
answers exactly as an unknown one does: 404.

Message content is only ever in a response body, never in a log line (the server writes no
access log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import asyncpg
from aiohttp import web

from minichat.domain.periods import periods_for
from minichat.domain.quota_view import quota_view
from minichat.domain.spend import MAX_ROWS, spend_query
from minichat.models.policy import Policy
from minichat.processors.tokens import TokenStore
from minichat.storage.db import ping
from minichat.storage.read_api import (
    SPEND_COLUMNS,
    Cursor,
    chat_messages,
    chat_turn,
    reading_as,
    spend_rows,
    user_quota,
)

logger = logging.getLogger(__name__)

PAGE_DEFAULT = 50
PAGE_MAX = 500

ROUTES = (
    ("/health", "health"),
    ("/ready", "ready"),
    ("/v1/chats/{chat_id}/messages", "chat_messages"),
    ("/v1/chats/{chat_id}/turns/{request_id}", "chat_turn"),
    ("/v1/users/{user_id}/quota", "user_quota"),
    ("/v1/usage", "usage"),
)
"""Paths and view names; docs/openapi.yaml documents exactly these (and /metrics)."""
MESSAGE_FIELDS = (
    "message_id",
    "request_id",
    "role",
    "content",
    "model",
    "input_tokens",
    "output_tokens",
    "created_at",
)
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "web_search_calls",
    "code_interpreter_calls",
)
TURN_FIELDS = (
    "chat_id",
    "request_id",
    "state",
    "decision",
    "billing_outcome",
    "settlement_method",
    "committed_credits_micro",
    "usage",
    "settled_at",
)
QUOTA_FIELDS = ("user_id", "policy_version", "buckets", "tools", "blocked")
SPEND_FIGURES = ("turns", "input_tokens", "output_tokens", "charged_credits_micro")


# ------------------------------------------------------------------------------------- responses

JSON_TYPE = "application/json"
CURSOR_MAX = 512
"""Characters of an `after` cursor, at most (one is about 150)."""
ENVELOPE_BYTES = 256
"""Bytes a messages page keeps for its envelope (`{"messages":[`, `],"next":"..."}`)."""
ACQUIRE_TIMEOUT_S = 10.0
"""How long a request waits for one of the read pool's connections before it answers 503."""
WRITE_TIMEOUT_S = 30.0
"""How long a client may take to read a messages page: a slow reader holds a request slot."""


def dumps(body: Any) -> bytes:
    """Compact UTF-8 JSON (no escaped code points: an emoji is 4 bytes, not 12)."""
    return json.dumps(body, default=_encode, separators=(",", ":"), ensure_ascii=False).encode()


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type=JSON_TYPE, headers=headers)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(type(value).__name__)


def unauthorized() -> web.Response:
    return _json({"error": "unauthorized"}, 401, {"WWW-Authenticate": 'Bearer realm="minichat"'})


def not_found() -> web.Response:
    return _json({"error": "not_found"}, 404)


def busy(detail: str) -> web.Response:
    """503 with `Retry-After`: the read API's slots or connections are taken; come back later."""
    return _json({"error": "busy", "detail": detail}, 503, {"Retry-After": "1"})


def _bad_request(detail: str) -> web.Response:
    return _json({"error": "bad_request", "detail": detail}, 400)


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text) if len(text) <= 64 else None
    except ValueError:
        return None


def encode_cursor(cursor: Cursor) -> str:
    at = cursor.turn_at.astimezone(UTC).isoformat()
    raw = f"{cursor.turn_seq}|{at}|{cursor.turn_key}|{cursor.rank}|{cursor.message_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor | None:
    """The cursor `encode_cursor` wrote, or None for anything else (a cursor is opaque: any other
    text, an unknown shape, a naive or out-of-range time is refused, never passed on)."""
    if len(text) > CURSOR_MAX or not text.isascii():
        return None
    try:
        padded = text.translate(_URLSAFE) + "=" * (-len(text) % 4)
        seq, at, turn_key, rank, message_id = base64.b64decode(padded, validate=True).decode().split("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None or rank not in ("0", "1", "2") or not _SEQ.fullmatch(seq):
            return None
        return Cursor(int(seq), when.astimezone(UTC), UUID(turn_key), int(rank), UUID(message_id))
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        return None


_URLSAFE = str.maketrans("-_", "+/")
_SEQ = re.compile(r"0|[1-9][0-9]{0,17}")
"""A turn number: ASCII digits, no sign or leading zero, within PostgreSQL's bigint."""
_COLUMN = {"message_id": "id"}


# ---------------------------------------------------------------------------------------- routes


def read_api_routes(
    policy: Policy,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    tokens: TokenStore,
    not_ready: Callable[[], str | None],
    page_max_bytes: int,
) -> list[web.RouteDef]:
    """The contract's routes (`ROUTES`) as aiohttp routes. `pool` is the read API's own pool;
    `not_ready` says why the worker is not ready (None when it is)."""
    api = _ReadApi(policy, pool, tokens, not_ready, page_max_bytes)

    async def health(request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    views: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        "health": health,
        "ready": api.ready,
        "chat_messages": api.messages,
        "chat_turn": api.turn,
        "user_quota": api.quota,
        "usage": api.usage,
    }
    return [web.get(path, views[name], name=name) for path, name in ROUTES]


@dataclass(frozen=True)
class _ReadApi:
    """What the routes need: the policy (for `blocked`), the read pool, the tokens, readiness."""

    policy: Policy
    pool: Callable[[], Awaitable[asyncpg.Pool]]
    tokens: TokenStore
    not_ready: Callable[[], str | None]
    page_max_bytes: int

    async def ready(self, request: web.Request) -> web.StreamResponse:
        reason = self.not_ready()
        if reason is None:
            try:
                db = await self.pool()
                async with db.acquire(timeout=2) as con:
                    await ping(con)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                reason = f"database not answering ({type(exc).__name__})"
        if reason is not None:
            return _json({"status": "not_ready", "reason": reason}, 503)
        return _json({"status": "ready"})

    def caller(self, request: web.Request, *names: str) -> tuple[UUID, list[UUID]] | web.Response:
        """The token's tenant and the path's ids, or the response that refuses the request: 401
        without a known token (a header that is not printable ASCII cannot hold one), 404 for an id
        that is not a UUID (as for an unknown one)."""
        header = request.headers.get("Authorization")
        if header is not None and not (header.isascii() and header.isprintable()):
            return unauthorized()
        tenant = self.tokens.tenant_for(header)
        if tenant is None:
            return unauthorized()
        parsed = [_uuid(request.match_info[name]) for name in names]
        if any(p is None for p in parsed):
            return not_found()
        return tenant, [p for p in parsed if p is not None]

    async def messages(self, request: web.Request) -> web.StreamResponse:
        found_caller = self.caller(request, "chat_id")
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, [chat] = found_caller
        page = _page(request.query)
        if isinstance(page, str):
            return _bad_request(page)
        limit, after = page
        budget = self.page_max_bytes - ENVELOPE_BYTES
        parts, count, used = [b'{"messages":['], 0, 0
        last, page_rows = None, 0
        try:
            async with reading_as(await self.pool(), tenant, acquire_timeout=ACQUIRE_TIMEOUT_S) as con:
                rows = await chat_messages(con, tenant, chat, limit, after, budget)
                if rows is None:
                    return not_found()
                async with aclosing(rows):  # serialised as they arrive, message by message
                    async for row in rows:
                        item = dumps({f: row.fields[_COLUMN.get(f, f)] for f in MESSAGE_FIELDS})
                        if count and used + 1 + len(item) > budget:
                            break
                        parts += [b",", item] if count else [item]
                        count, used = count + 1, used + len(item) + (1 if count else 0)
                        last, page_rows = row.cursor, row.page_rows
                        if count == limit:
                            break
        except TimeoutError:
            return busy("no database connection free")
        more = last is not None and count < page_rows
        parts.append(b'],"next":' + dumps(encode_cursor(last) if more and last else None) + b"}")
        return await _send(request, parts)

    async def turn(self, request: web.Request) -> web.StreamResponse:
        found_caller = self.caller(request, "chat_id", "request_id")
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, [chat, req] = found_caller
        try:
            async with reading_as(await self.pool(), tenant, acquire_timeout=ACQUIRE_TIMEOUT_S) as con:
                row = await chat_turn(con, tenant, chat, req)
        except TimeoutError:
            return busy("no database connection free")
        if row is None:
            return not_found()
        decision = row["decision"]
        usage = {k: row[k] for k in USAGE_FIELDS} if row.get("input_tokens") is not None else None
        shown = {
            **{field: row.get(field) for field in TURN_FIELDS},
            "chat_id": chat,
            "request_id": req,
            "decision": {**decision, "replay": False} if decision is not None else None,
            "usage": usage,
        }
        return _json(shown)

    async def quota(self, request: web.Request) -> web.StreamResponse:
        found_caller = self.caller(request, "user_id")
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, [user] = found_caller
        periods = periods_for(datetime.now(UTC))
        try:
            async with reading_as(await self.pool(), tenant, acquire_timeout=ACQUIRE_TIMEOUT_S) as con:
                stored = await user_quota(con, tenant, user, periods.daily, periods.monthly)
        except TimeoutError:
            return busy("no database connection free")
        if stored is None:
            return not_found()
        shown = quota_view(self.policy, tenant, periods, stored)
        body = {
            "user_id": user,
            "policy_version": self.policy.version,
            "buckets": [{**asdict(b), "remaining": b.remaining} for b in shown.buckets],
            "tools": [asdict(t) for t in shown.tools],
            "blocked": asdict(shown.blocked) if shown.blocked is not None else None,
        }
        assert tuple(body) == QUOTA_FIELDS
        return _json(body)

    async def usage(self, request: web.Request) -> web.StreamResponse:
        """The spend report: settled turns, priced tokens and charged credits of the tenant's
        users by UTC day of the turn's quota period (adjustments included), grouped as asked."""
        found_caller = self.caller(request)
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, _ = found_caller
        q = request.query
        asked = spend_query(
            q.getall("from", []), q.getall("to", []), q.getall("group_by", []), q.getall("user_id", [])
        )
        if isinstance(asked, str):
            return _bad_request(asked)
        try:
            async with reading_as(await self.pool(), tenant, acquire_timeout=ACQUIRE_TIMEOUT_S) as con:
                rows = await spend_rows(
                    con, tenant, asked.start, asked.end, asked.group_by, asked.user_id, MAX_ROWS + 1
                )
        except TimeoutError:
            return busy("no database connection free")
        if len(rows) > MAX_ROWS:
            return _bad_request(f"more than {MAX_ROWS} rows: narrow the dates, the grouping or the user")
        columns = [SPEND_COLUMNS[k] for k in asked.group_by]
        body = {
            "from": asked.start,
            "to": asked.end,
            "group_by": list(asked.group_by),
            "user_id": asked.user_id,
            "rows": [{c: r[c] for c in (*columns, *SPEND_FIGURES)} for r in rows],
        }
        return _json(body)


async def _send(request: web.Request, parts: list[bytes]) -> web.StreamResponse:
    """Write a body while the request still holds its slot (a slow reader holds one slot, not
    unbounded memory), closing the connection of a client that does not read it in time."""
    response = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
    response.content_length = sum(map(len, parts))
    await response.prepare(request)
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            for part in parts:
                await response.write(part)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    return response


_LIMIT = re.compile(r"[0-9]{1,4}")


def _page(query: Mapping[str, str]) -> tuple[int, Cursor | None] | str:
    """`limit` and `after` of a listing, or what is wrong with them."""
    text = query.get("limit", str(PAGE_DEFAULT))
    if not _LIMIT.fullmatch(text):
        return "limit must be an integer"
    limit = int(text)
    if not 1 <= limit <= PAGE_MAX:
        return f"limit must be between 1 and {PAGE_MAX}"
    after = None
    if "after" in query:
        after = decode_cursor(query["after"])
        if after is None:
            return "after is not a cursor of this listing"
    return limit, after
