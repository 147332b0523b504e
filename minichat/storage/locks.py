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
from minichat.storage import combined, coordination
from minichat.storage.db import columns

RequestKey = tuple[UUID, UUID]
"""(chat_id, request_id): a turn, and the key its provider and usage events carry."""


def _begin(claim: str) -> str:
    """The batch's first statement around `claim` (`coordination.CLAIM_LOCK` or `CLAIM_SHARE`, `$1`..`$3`)."""
    return f"""
WITH claimed AS MATERIALIZED ({claim.strip()}),
owners AS MATERIALIZED (
    SELECT c.id, c.tenant_id, c.user_id
    FROM unnest($4::uuid[], $5::uuid[]) AS k (tenant_id, chat_id)
    JOIN chats c ON c.id = k.chat_id AND c.tenant_id = k.tenant_id
),
locked AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock(h)) AS taken
    FROM (SELECT 0 AS kind, hashtextextended(k, 0) AS h FROM unnest($6::text[]) AS k
          UNION
          SELECT 1, hashtextextended(k, 0) FROM unnest($7::text[]) AS k
          UNION
          SELECT 1, hashtextextended('quota:' || o.tenant_id || ':' || o.user_id, 0) FROM owners o
          ORDER BY kind, h) AS keys
    WHERE (SELECT count(*) FROM claimed) >= 0
)
SELECT * FROM (
    SELECT 'locked' AS part, NULL::text AS topic, NULL::int AS partition, NULL::bigint AS next_offset,
           NULL::uuid AS chat_id, NULL::uuid AS tenant_id, NULL::uuid AS user_id
    FROM locked
    UNION ALL
    SELECT 'position', topic, partition, next_offset, NULL, NULL, NULL FROM claimed
    UNION ALL
    SELECT 'owner', NULL, NULL, NULL, id, tenant_id, user_id FROM owners
) AS found
"""


# One statement (the batch's first): the position claim locks its rows (`coordination`), then the
# request locks, then the user locks (the requesters' and the owners' of the chats the facts
# name, read here), each set by hash; the rows say what the claim found and who owns those chats.
# The claim's rows come first (the `WHERE` on `claimed` is evaluated before any advisory lock), so
# two workers claiming one partition meet there, never in a cycle with the advisory locks.
_BEGIN_LOCK = _begin(coordination.CLAIM_LOCK)
_BEGIN_SHARE = _begin(coordination.CLAIM_SHARE)


async def lock_batch(
    con: asyncpg.Connection,
    requests: Iterable[RequestKey],
    users: Iterable[UserKey],
    fact_chats: Iterable[tuple[UUID, UUID]] = (),
) -> dict[UUID, UserKey]:
    """Take the batch's request and user locks (re-taking a held one does not wait), the users
    including the owners of `fact_chats` ((tenant, chat) pairs); with the frame's position claim
    when one is pending (`combined.take_claim`: `PositionConflict` when the rows moved). Returns
    chat id -> (tenant, owner) of the `fact_chats` that exist."""
    request_keys = sorted({f"turn:{chat}:{request}" for chat, request in requests})
    user_keys = sorted({f"quota:{tenant}:{user}" for tenant, user in users})
    chats = list(set(fact_chats))
    claim = combined.take_claim()
    if claim is None and not (request_keys or user_keys or chats):
        return {}
    sql, group, positions = _BEGIN_LOCK, "", columns((), 2)
    if claim is not None:
        group = claim.group_id
        sql = _BEGIN_SHARE if claim.shared else _BEGIN_LOCK
        positions = coordination.claim_columns(claim)
    rows = await con.fetch(sql, group, *positions, *columns(chats, 2), request_keys, user_keys)
    stored: dict[tuple[str, int], int] = {}
    owners: dict[UUID, UserKey] = {}
    for row in rows:
        if row["part"] == "position":
            stored[(row["topic"], row["partition"])] = row["next_offset"]
        elif row["part"] == "owner":
            owners[row["chat_id"]] = (row["tenant_id"], row["user_id"])
    if claim is not None:
        coordination.check_claim(claim.expected, stored)
    return owners
