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
from typing import Final
from uuid import UUID

import asyncpg

from minichat.domain.commands import UserKey
from minichat.storage.db import columns

RequestKey = tuple[UUID, UUID]
"""(chat_id, request_id): a turn, and the key its provider and usage events carry."""


# One statement (after the position claim): the request locks, then the user locks (the
# requesters' and the owners' of the chats the facts name, read here), each set by hash; the rows
# say who owns those chats.
_LOCK: Final = """
WITH owners AS MATERIALIZED (
    SELECT c.id, c.tenant_id, c.user_id
    FROM unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, chat_id)
    JOIN chats c ON c.id = k.chat_id AND c.tenant_id = k.tenant_id
),
locked AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock(h)) AS taken
    FROM (SELECT 0 AS kind, hashtextextended(k, 0) AS h FROM unnest($3::text[]) AS k
          UNION
          SELECT 1, hashtextextended(k, 0) FROM unnest($4::text[]) AS k
          UNION
          SELECT 1, hashtextextended('quota:' || o.tenant_id || ':' || o.user_id, 0) FROM owners o
          ORDER BY kind, h) AS keys
)
SELECT o.id AS chat_id, o.tenant_id, o.user_id FROM locked LEFT JOIN owners o ON true
"""
# `locked` is the preserved side of the join: it is evaluated (every lock taken) even when no
# owner is found; a plain join with an empty `owners` would never read it.


async def lock_batch(
    con: asyncpg.Connection,
    requests: Iterable[RequestKey],
    users: Iterable[UserKey],
    fact_chats: Iterable[tuple[UUID, UUID]] = (),
) -> dict[UUID, UserKey]:
    """Take the batch's request and user locks (re-taking a held one does not wait), the users
    including the owners of `fact_chats` ((tenant, chat) pairs). Returns chat id -> (tenant,
    owner) of the `fact_chats` that exist."""
    request_keys = sorted({f"turn:{chat}:{request}" for chat, request in requests})
    user_keys = sorted({f"quota:{tenant}:{user}" for tenant, user in users})
    chats = list(set(fact_chats))
    if not (request_keys or user_keys or chats):
        return {}
    rows = await con.fetch(_LOCK, *columns(chats, 2), request_keys, user_keys)
    return {row["chat_id"]: (row["tenant_id"], row["user_id"]) for row in rows if row["chat_id"] is not None}
