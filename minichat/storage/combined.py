"""Fewer statements per batch: a step's writes as one statement, and the batch transaction's own
writes (the applied order, the stored positions) sent along with the first of them.

Client CPU per statement (~100 µs: encode, send, parse the reply) is most of a small batch's cost,
so a step's writes go out as one statement of data-modifying CTEs (`execute_parts`): each part is
an ordinary `INSERT`/`UPDATE` written with its own parameters from `$1`, renumbered here. The parts
of one statement run on one snapshot and cannot see each other's rows: a caller combines only
parts that touch different rows (it sends the others as statements of their own), and foreign keys
are checked at the end of the statement, as for separate statements.

`Frame`: what the engine adds to every batch transaction: the order-log rows and the positions to
store go out with the batch's first write; whatever the batch never sent is sent at its end. (The
position claim stays a statement of its own, the transaction's first: a worker frozen right after
it holds only its own position rows, never the request and user locks other workers' batches
need; tests/integration/test_zombie_rebalance.py.) The frame is found
through a context variable (as `statements.count_statements` finds its counter) that the engine
sets for the transaction's own task, so `minichat replay` and the tests, which set none, run
every statement as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Final

import asyncpg

SYSTEM_LEVEL: Final = (
    "composes other modules' statements (each checked where it is written) into one; its own SQL "
    "only counts the rows each part wrote"
)

_PARAMETER = re.compile(r"\$(\d+)")


@dataclass(frozen=True, slots=True)
class Part:
    """One data-modifying statement and its parameters, numbered from `$1`. Without `report` it
    has no `RETURNING` (only its count comes back)."""

    sql: str
    params: Sequence[object]
    report: str | None = None
    """A condition on the rows the statement's own `RETURNING` gives: those rows come back, as
    tuples in `RETURNING` order, beside the counts (`execute_parts_reported`)."""


_COMPOSED: dict[tuple[tuple[str, str | None], ...], str] = {}


def _shifted(sql: str, offset: int) -> str:
    return _PARAMETER.sub(lambda m: f"${int(m.group(1)) + offset}", sql.strip())


def _composed(shape: tuple[tuple[str, str | None], ...]) -> str:
    """`WITH w0 AS (part RETURNING 1), ...`, the count of each, then each report's rows: the
    text, built once per shape."""
    text = _COMPOSED.get(shape)
    if text is None:
        ctes, offset = [], 0
        for i, (sql, report) in enumerate(shape):
            returning = "" if report else "\nRETURNING 1"
            ctes.append(f"w{i} AS (\n{_shifted(sql, offset)}{returning}\n)")
            offset += max((int(n) for n in _PARAMETER.findall(sql)), default=0)
        counts = [f"(SELECT count(*) FROM w{i})" for i in range(len(shape))]
        reports = [
            f"(SELECT array_agg(r) FROM w{i} r WHERE {report})"
            for i, (_, report) in enumerate(shape)
            if report
        ]
        text = _COMPOSED[shape] = "WITH " + ",\n".join(ctes) + f"\nSELECT {', '.join(counts + reports)}"
    return text


async def execute_parts(con: asyncpg.Connection, parts: Sequence[Part]) -> list[int]:
    """The rows each part wrote, every part in one statement (with the frame's pending writes
    first, when a frame is active and they were not sent yet)."""
    return (await execute_parts_reported(con, parts))[0]


async def execute_parts_reported(
    con: asyncpg.Connection, parts: Sequence[Part]
) -> tuple[list[int], list[object]]:
    """`execute_parts`, and the value of each part's `report` (None for a part without one)."""
    frame = _FRAME.get()
    if frame is not None and frame.tail:
        parts = [*frame.tail, *parts]
        tail, frame.tail = len(frame.tail), []
    else:
        tail = 0
    if not parts:
        return [], []
    if len(parts) == 1 and parts[0].report is None:
        status = await con.execute(parts[0].sql, *parts[0].params)
        none: list[object] = [None]
        return [int(status.rsplit(" ", 1)[-1])][tail:], none[tail:]
    params = [x for p in parts for x in p.params]
    row = list(await con.fetchrow(_composed(tuple((p.sql, p.report) for p in parts)), *params))
    counts, values = row[: len(parts)], iter(row[len(parts) :])
    reports = [next(values) if p.report else None for p in parts]
    return counts[tail:], reports[tail:]


# ------------------------------------------------------------------------------------ frame


@dataclass(slots=True)
class Frame:
    """A batch transaction's own statements not sent yet."""

    tail: list[Part] = field(default_factory=list)


_FRAME: ContextVar[Frame | None] = ContextVar("minichat_frame", default=None)


def enter(frame: Frame) -> Token[Frame | None]:
    """Make `frame` the current task's (until `leave`)."""
    return _FRAME.set(frame)


def leave(token: Token[Frame | None]) -> None:
    _FRAME.reset(token)


def defer(part: Part) -> bool:
    """Send `part` with the transaction's first write; False when no frame is active."""
    frame = _FRAME.get()
    if frame is None:
        return False
    frame.tail.append(part)
    return True
