"""Statements per batch: how many the worker sends to PostgreSQL for one merged batch.

Client CPU per statement is a large part of a small batch's cost, so the worker counts them
(`minichat_batch_statements`). The pool's connections are `CountingConnection`s: every statement
sent with the extended protocol (`fetch`, `fetchrow`, `fetchval`, `execute` with parameters,
`executemany`, and asyncpg's own type introspection) adds one to the counter of the batch whose
code sent it. BEGIN and COMMIT (the simple protocol) are not counted.

The batch is found through a context variable: `count_statements()` in the batch's task starts a
counter, and the tasks it starts (the concurrent groups of a split batch) inherit it; the relay,
the watchdog and `/metrics` run in tasks of their own and are never counted. The cost is a context
variable lookup and an integer addition per statement (measured: well under 1 µs, against ~100 µs
of client CPU a statement costs).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import asyncpg


class StatementCount:
    """Statements counted since `count_statements()` made it."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


_CURRENT: ContextVar[StatementCount | None] = ContextVar("minichat_statements", default=None)


def count_statements() -> StatementCount:
    """Count the statements this task (and the tasks it starts from here on) sends."""
    count = StatementCount()
    _CURRENT.set(count)
    return count


class CountingConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that adds each statement it sends to the current `StatementCount`."""

    async def _do_execute(self, *args: Any, **kwargs: Any) -> Any:
        count = _CURRENT.get()
        if count is not None:
            count.sent += 1
        return await super()._do_execute(*args, **kwargs)
