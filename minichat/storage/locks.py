"""The advisory locks a batch takes before any row lock: every request it touches, then every user
whose quota it may read or change. One statement, one global order (requests, then users, each by
hash), so two transactions (two workers, or a worker and a rebuild) never wait on each other in a
cycle.

Requests: events of one request are serialised with the command that creates it (an event is
either parked before the command's transaction or finds the turn after it). Users: one user's
check-and-reserve is atomic across partitions and workers, since a user's quota rows are shared by
chats of every partition. Transaction-scoped: the commit or rollback releases them.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import asyncpg

from minichat.domain.commands import UserKey

RequestKey = tuple[UUID, UUID]
"""(chat_id, request_id): a turn, and the key its provider and usage events carry."""

_LOCK = """
SELECT pg_advisory_xact_lock(h)
FROM (SELECT 0 AS kind, hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k
      UNION
      SELECT 1, hashtextextended(k, 0) FROM unnest($2::text[]) AS k
      ORDER BY kind, h) AS keys
"""


async def lock_batch(
    con: asyncpg.Connection, requests: Iterable[RequestKey], users: Iterable[UserKey]
) -> None:
    """Take the batch's request and user locks (re-taking a held one does not wait)."""
    request_keys = sorted({f"turn:{chat}:{request}" for chat, request in requests})
    user_keys = sorted({f"quota:{tenant}:{user}" for tenant, user in users})
    if request_keys or user_keys:
        await con.execute(_LOCK, request_keys, user_keys)
