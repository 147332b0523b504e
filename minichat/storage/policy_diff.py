"""SQL of `minichat policy diff`: what the dry run's books hold for the commands of the window,
next to what the workers recorded, per tenant. Read-only; each statement takes the tenants it
reports on (`tenant_id = ANY($1)`).

The window is on the command's event time (`turn_decisions.decided_at`, its record timestamp):
`[from, to)`, either bound open when NULL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from uuid import UUID

import asyncpg

_WINDOW: Final = (
    "($2::timestamptz IS NULL OR d.decided_at >= $2) AND ($3::timestamptz IS NULL OR d.decided_at < $3)"
)

# Each turn-creating command of the window, as decided in these books and as `turn-decisions`
# recorded it (the rebuild's temporary `recorded_decisions`; 'none' when nothing was recorded),
# counted per tenant, user and pair of outcomes.
_OUTCOMES: Final = f"""
SELECT d.tenant_id,
       coalesce(r.payload->>'decision', 'none') AS recorded, r.payload->>'error_code' AS recorded_code,
       d.decision AS candidate, d.error_code AS candidate_code, count(*) AS n
FROM turn_decisions d
LEFT JOIN recorded_decisions r
       ON r.tenant_id = d.tenant_id AND r.chat_id = d.chat_id AND r.command_id = d.command_id
WHERE d.tenant_id = ANY($1::uuid[]) AND d.command IN ('turn.requested', 'turn.retry', 'turn.edit')
  AND {_WINDOW}
GROUP BY 1, 2, 3, 4, 5
"""

# The window's commands whose decision or code differs from the recorded one (its user is known
# from the command itself).
_CHANGED: Final = f"""
SELECT d.tenant_id, d.chat_id, d.command_id
FROM turn_decisions d
LEFT JOIN recorded_decisions r
       ON r.tenant_id = d.tenant_id AND r.chat_id = d.chat_id AND r.command_id = d.command_id
WHERE d.tenant_id = ANY($1::uuid[]) AND d.command IN ('turn.requested', 'turn.retry', 'turn.edit')
  AND {_WINDOW}
  AND (r.payload IS NULL OR r.payload->>'decision' IS DISTINCT FROM d.decision
       OR r.payload->>'error_code' IS DISTINCT FROM d.error_code)
"""

# Settled charges of the turns the window's commands started, per tenant and user (adjustments
# included: `committed_credits_micro` is the turn's charge after them).
_CHARGES: Final = f"""
SELECT t.tenant_id, t.requester_user_id AS user_id, sum(t.committed_credits_micro)::bigint AS charged
FROM chat_turns t
JOIN turn_decisions d ON d.chat_id = t.chat_id AND d.command_id = t.request_id AND d.tenant_id = t.tenant_id
WHERE t.tenant_id = ANY($1::uuid[]) AND t.settled_at IS NOT NULL AND {_WINDOW}
GROUP BY 1, 2
"""

# Events of one type written to the outbox for the window's tenants, by their own event time.
_OUTBOX_EVENTS: Final = """
SELECT o.tenant_id, count(*) AS n
FROM outbox o
WHERE o.tenant_id = ANY($1::uuid[]) AND o.event_type = $4
  AND ($2::timestamptz IS NULL OR (o.payload->>'occurred_at')::timestamptz >= $2)
  AND ($3::timestamptz IS NULL OR (o.payload->>'occurred_at')::timestamptz < $3)
GROUP BY 1
"""


@dataclass(frozen=True)
class OutcomeCount:
    tenant_id: UUID
    recorded: str
    recorded_code: str | None
    candidate: str
    candidate_code: str | None
    n: int


@dataclass(frozen=True)
class Charge:
    tenant_id: UUID
    user_id: UUID | None
    charged: int


async def window_outcomes(
    con: asyncpg.Connection, tenants: Sequence[UUID], start: datetime | None, end: datetime | None
) -> list[OutcomeCount]:
    """On the dry run's connection (its temporary `recorded_decisions` is read)."""
    rows = await con.fetch(_OUTCOMES, list(tenants), start, end)
    return [OutcomeCount(**dict(row)) for row in rows]


async def changed_commands(
    con: asyncpg.Connection, tenants: Sequence[UUID], start: datetime | None, end: datetime | None
) -> list[tuple[UUID, UUID, UUID]]:
    """(tenant, chat, command id) of each changed command; on the dry run's connection."""
    rows = await con.fetch(_CHANGED, list(tenants), start, end)
    return [(row["tenant_id"], row["chat_id"], row["command_id"]) for row in rows]


async def window_charges(
    con: asyncpg.Connection, tenants: Sequence[UUID], start: datetime | None, end: datetime | None
) -> list[Charge]:
    """On any books: the dry run's, or the live database's (read in a read-only transaction)."""
    async with con.transaction(readonly=True):
        rows = await con.fetch(_CHARGES, list(tenants), start, end)
    return [Charge(row["tenant_id"], row["user_id"], int(row["charged"])) for row in rows]


async def window_outbox_events(
    con: asyncpg.Connection, tenants: Sequence[UUID], start: datetime | None, end: datetime | None, kind: str
) -> dict[UUID, int]:
    """Outbox rows of `kind` per tenant (read-only)."""
    async with con.transaction(readonly=True):
        rows = await con.fetch(_OUTBOX_EVENTS, list(tenants), start, end, kind)
    return {row["tenant_id"]: int(row["n"]) for row in rows}
