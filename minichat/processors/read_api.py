"""The read API on the worker's web port (docs/contract.md, "Read API"): health, readiness, a chat's
messages, a turn, a user's quota. `/v1/` routes need a bearer token of one tenant; reads run as
`minichat_reader` with that tenant (row-level security), so another tenant's chat, turn or user
answers exactly as an unknown one does: 404.

Access logs carry paths (ids) only; message content is only ever in a response body.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import faust

from minichat.domain.periods import periods_for
from minichat.domain.quota_view import quota_view
from minichat.models.policy import Policy
from minichat.processors.tokens import TokenStore
from minichat.storage.db import ping
from minichat.storage.read_api import Cursor, chat_messages, chat_turn, reading_as, user_quota

logger = logging.getLogger(__name__)

PAGE_DEFAULT = 50
PAGE_MAX = 500

ROUTES = (
    ("/health", "health"),
    ("/ready", "ready"),
    ("/v1/chats/{chat_id}/messages", "chat_messages"),
    ("/v1/chats/{chat_id}/turns/{request_id}", "chat_turn"),
    ("/v1/users/{user_id}/quota", "user_quota"),
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


# ------------------------------------------------------------------------------------- responses


def _json(view: Any, body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Any:
    payload = json.dumps(body, default=_encode, separators=(",", ":")).encode()
    return view.bytes(payload, content_type="application/json", status=status, headers=dict(headers or {}))


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(type(value).__name__)


def _unauthorized(view: Any) -> Any:
    return _json(view, {"error": "unauthorized"}, 401, {"WWW-Authenticate": 'Bearer realm="minichat"'})


def _not_found(view: Any) -> Any:
    return _json(view, {"error": "not_found"}, 404)


def _bad_request(view: Any, detail: str) -> Any:
    return _json(view, {"error": "bad_request", "detail": detail}, 400)


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def encode_cursor(cursor: Cursor) -> str:
    raw = f"{cursor.created_at.astimezone(UTC).isoformat()}|{cursor.message_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, message_id = raw.split("|")
        return Cursor(datetime.fromisoformat(at), UUID(message_id))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------- routes


def register_read_api(
    app: faust.App,
    policy: Policy,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    tokens: TokenStore,
    not_ready: Callable[[], str | None],
) -> None:
    """The contract's routes on `app`'s web server. `not_ready` says why the worker is not ready
    (None when it is). faust makes a view class of each handler function (its `get`), so the
    handlers are plain functions that hand over to `_ReadApi`."""
    api = _ReadApi(policy, pool, tokens, not_ready)

    async def health(view: Any, request: Any) -> Any:
        return _json(view, {"status": "ok"})

    async def ready(view: Any, request: Any) -> Any:
        return await api.ready(view)

    async def messages(view: Any, request: Any, chat_id: str) -> Any:
        return await api.messages(view, request, chat_id)

    async def turn(view: Any, request: Any, chat_id: str, request_id: str) -> Any:
        return await api.turn(view, request, chat_id, request_id)

    async def quota(view: Any, request: Any, user_id: str) -> Any:
        return await api.quota(view, request, user_id)

    views: dict[str, Any] = {
        "health": health,
        "ready": ready,
        "chat_messages": messages,
        "chat_turn": turn,
        "user_quota": quota,
    }
    for path, name in ROUTES:
        app.page(path, name=name)(views[name])


@dataclass(frozen=True)
class _ReadApi:
    """What the routes need: the policy (for `blocked`), the worker's pool, the tokens, readiness."""

    policy: Policy
    pool: Callable[[], Awaitable[asyncpg.Pool]]
    tokens: TokenStore
    not_ready: Callable[[], str | None]

    async def ready(self, view: Any) -> Any:
        reason = self.not_ready()
        if reason is None:
            try:
                db = await self.pool()
                async with db.acquire(timeout=2) as con:
                    await ping(con)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                reason = f"database not answering ({type(exc).__name__})"
        if reason is not None:
            return _json(view, {"status": "not_ready", "reason": reason}, 503)
        return _json(view, {"status": "ready"})

    def caller(self, view: Any, request: Any, *ids: str) -> tuple[UUID, list[UUID]] | Any:
        """The token's tenant and the path's ids, or the response that refuses the request: 401
        without a known token, 404 for an id that is not a UUID (as for an unknown one)."""
        tenant = self.tokens.tenant_for(request.headers.get("Authorization"))
        if tenant is None:
            return _unauthorized(view)
        parsed = [_uuid(i) for i in ids]
        if any(p is None for p in parsed):
            return _not_found(view)
        return tenant, [p for p in parsed if p is not None]

    async def messages(self, view: Any, request: Any, chat_id: str) -> Any:
        found_caller = self.caller(view, request, chat_id)
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, [chat] = found_caller
        page = _page(request.query)
        if isinstance(page, str):
            return _bad_request(view, page)
        limit, after = page
        async with reading_as(await self.pool(), tenant) as con:
            found = await chat_messages(con, tenant, chat, limit, after)
        if found is None:
            return _not_found(view)
        rows, cursor = found
        items = [
            {field: m["id" if field == "message_id" else field] for field in MESSAGE_FIELDS} for m in rows
        ]
        return _json(view, {"messages": items, "next": encode_cursor(cursor) if cursor else None})

    async def turn(self, view: Any, request: Any, chat_id: str, request_id: str) -> Any:
        found_caller = self.caller(view, request, chat_id, request_id)
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, [chat, req] = found_caller
        async with reading_as(await self.pool(), tenant) as con:
            row = await chat_turn(con, tenant, chat, req)
        if row is None:
            return _not_found(view)
        decision = row["decision"]
        usage = {k: row[k] for k in USAGE_FIELDS} if row.get("input_tokens") is not None else None
        shown = {
            **{field: row.get(field) for field in TURN_FIELDS},
            "chat_id": chat,
            "request_id": req,
            "decision": {**decision, "replay": False} if decision is not None else None,
            "usage": usage,
        }
        return _json(view, shown)

    async def quota(self, view: Any, request: Any, user_id: str) -> Any:
        found_caller = self.caller(view, request, user_id)
        if not isinstance(found_caller, tuple):
            return found_caller
        tenant, [user] = found_caller
        periods = periods_for(datetime.now(UTC))
        async with reading_as(await self.pool(), tenant) as con:
            stored = await user_quota(con, tenant, user, periods.daily, periods.monthly)
        if stored is None:
            return _not_found(view)
        shown = quota_view(self.policy, tenant, periods, stored)
        body = {
            "user_id": user,
            "policy_version": self.policy.version,
            "buckets": [{**asdict(b), "remaining": b.remaining} for b in shown.buckets],
            "tools": [asdict(t) for t in shown.tools],
            "blocked": asdict(shown.blocked) if shown.blocked is not None else None,
        }
        assert tuple(body) == QUOTA_FIELDS
        return _json(view, body)


def _page(query: Mapping[str, str]) -> tuple[int, Cursor | None] | str:
    """`limit` and `after` of a listing, or what is wrong with them."""
    try:
        limit = int(query.get("limit", PAGE_DEFAULT))
    except ValueError:
        return "limit must be an integer"
    if not 1 <= limit <= PAGE_MAX:
        return f"limit must be between 1 and {PAGE_MAX}"
    after = None
    if "after" in query:
        after = decode_cursor(query["after"])
        if after is None:
            return "after is not a cursor of this listing"
    return limit, after
