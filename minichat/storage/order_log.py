"""`order_log`: per batch transaction and partition set, the order in which the worker applied
the set's records (written in the batch's transaction, published to `order-log` by the relay and
deleted once acknowledged; `processors/order_log.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from minichat.storage.combined import Part

SYSTEM_LEVEL: Final = (
    "the applied order: per partition set, offsets of the input topics a batch applied (operator "
    "data, no tenant, no content); the relay's scan reads every set's rows in id order"
)

_INSERT: Final = """
INSERT INTO order_log (partition_set, payload)
SELECT k.partition_set, k.payload
FROM unnest($1::int[], $2::text[]) WITH ORDINALITY AS k (partition_set, payload, n)
ORDER BY k.n
"""

_FETCH: Final = """
SELECT id, partition_set, payload, stored_seen_at
FROM order_log
ORDER BY id
LIMIT $1
"""

_DELETE: Final = "DELETE FROM order_log WHERE id = ANY($1::bigint[])"


@dataclass(frozen=True, slots=True)
class OrderRow:
    id: int
    partition_set: int
    payload: bytes  # the record value, byte for byte
    stored_seen_at: datetime


def order_part(entries: Sequence[tuple[int, str]]) -> Part | None:
    """`insert_order` as a part of another statement (`combined.execute_parts`)."""
    if not entries:
        return None
    return Part(_INSERT, [[e[0] for e in entries], [e[1] for e in entries]])


async def insert_order(con: asyncpg.Connection, entries: Sequence[tuple[int, str]]) -> None:
    """Add (partition set, `order.applied` JSON) rows inside the caller's batch transaction."""
    if entries:
        await con.execute(_INSERT, [e[0] for e in entries], [e[1] for e in entries])


async def fetch_order(con: asyncpg.Connection, limit: int) -> list[OrderRow]:
    """The oldest rows, in id order (the relay only)."""
    return [
        OrderRow(r["id"], r["partition_set"], r["payload"].encode("utf-8"), r["stored_seen_at"])
        for r in await con.fetch(_FETCH, limit)
    ]


async def delete_order(con: asyncpg.Connection, rows: Sequence[OrderRow]) -> None:
    """Forget rows Kafka acknowledged."""
    if rows:
        await con.execute(_DELETE, [r.id for r in rows])
