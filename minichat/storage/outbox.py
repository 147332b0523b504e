"""The billing outbox: written inside the settlement transaction, read and marked by the relay.

Inserts and marks carry the tenant. The relay's scan (`fetch_unpublished`) is the one system-level
query: it reads every tenant's unpublished rows in id order, which is what keeps one relay's output
in commit order per turn. Payloads go in as JSON text cast to jsonb, so the pool's jsonb codec does
not matter, and come out as jsonb's canonical text: the bytes the relay publishes, identical on
every re-publish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from minichat.models.events import UsageAdjusted, UsageSettled
from minichat.storage.combined import Part


class OutboxEntry(NamedTuple):
    """One event for billing; `payload` is its JSON text (stored as jsonb)."""

    tenant_id: UUID
    dedupe_key: str
    event_type: str
    payload: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    tenant_id: UUID
    dedupe_key: str
    event_type: str
    payload: bytes  # the stored jsonb as text, UTF-8: the record value, byte for byte
    created_at: datetime
    stored_seen_at: datetime  # processing clock: when the settling transaction stored it


def outbox_entry(event: UsageSettled | UsageAdjusted) -> OutboxEntry:
    """The outbox row of a settlement event; `created_at` is its event time (`settled_at`)."""
    return OutboxEntry(
        tenant_id=event.tenant_id,
        dedupe_key=event.dedupe_key,
        event_type=event.type,
        payload=event.model_dump_json(),
        created_at=event.settled_at,
    )


_INSERT = """
INSERT INTO outbox (tenant_id, dedupe_key, event_type, payload, created_at)
SELECT k.tenant_id, k.dedupe_key, k.event_type, k.payload::jsonb, k.created_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) WITH ORDINALITY
     AS k (tenant_id, dedupe_key, event_type, payload, created_at, n)
ORDER BY k.n
ON CONFLICT (dedupe_key) DO NOTHING
"""

_FETCH_UNPUBLISHED = """
SELECT id, tenant_id, dedupe_key, event_type, payload::text AS payload, created_at, stored_seen_at
FROM outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT $1
"""

_MARK_PUBLISHED = """
UPDATE outbox o
SET published_at = now()
FROM unnest($1::bigint[], $2::uuid[]) AS k (id, tenant_id)
WHERE o.id = k.id AND o.tenant_id = k.tenant_id AND o.published_at IS NULL
"""


def outbox_part(rows: Sequence[OutboxEntry]) -> Part | None:
    """`insert_outbox` as a part of a step's one write statement."""
    if not rows:
        return None
    return Part(
        _INSERT,
        [
            [r.tenant_id for r in rows],
            [r.dedupe_key for r in rows],
            [r.event_type for r in rows],
            [r.payload for r in rows],
            [r.created_at for r in rows],
        ],
    )


async def insert_outbox(con: asyncpg.Connection, rows: Sequence[OutboxEntry]) -> int:
    """Add billing events inside the caller's (settlement) transaction; returns how many were new.

    Idempotent on `dedupe_key`: a replayed settlement adds nothing. Ids follow the given order.
    """
    if not rows:
        return 0
    part = outbox_part(rows)
    assert part is not None
    status = await con.execute(part.sql, *part.params)
    return int(status.rsplit(" ", 1)[-1])


async def fetch_unpublished(con: asyncpg.Connection, limit: int) -> list[OutboxRow]:
    """The oldest unpublished rows of every tenant, in id order (system-level: the relay only)."""
    return [
        OutboxRow(
            id=r["id"],
            tenant_id=r["tenant_id"],
            dedupe_key=r["dedupe_key"],
            event_type=r["event_type"],
            payload=r["payload"].encode("utf-8"),
            created_at=r["created_at"],
            stored_seen_at=r["stored_seen_at"],
        )
        for r in await con.fetch(_FETCH_UNPUBLISHED, limit)
    ]


async def mark_published(con: asyncpg.Connection, rows: Sequence[OutboxRow]) -> int:
    """Mark rows published (processing clock) in one statement; returns how many changed."""
    if not rows:
        return 0
    status = await con.execute(_MARK_PUBLISHED, [r.id for r in rows], [r.tenant_id for r in rows])
    return int(status.rsplit(" ", 1)[-1])
