"""Connection pool and the small helpers every storage module shares; the connection-level
statements (a round trip, a server setting) that read no table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final

import asyncpg

from minichat.settings import Settings
from minichat.storage.statements import CountingConnection

SYSTEM_LEVEL: Final = "connection-level statements: a round trip and server settings, no table is read"


class RetryableConflict(RuntimeError):
    """State changed between a transaction's read and its write in a way a retry of the whole
    transaction resolves (the retry reads the new state). Never expected under the engine's locks."""


async def _init_connection(con: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects; one codec for every pool connection.
    await con.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await con.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(con: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`): one more round trip after every batch, for session state nothing here leaves
    behind (locks are transaction-scoped, roles and settings `LOCAL`; the leader locks live on
    connections of their own). An open transaction is still rolled back by the pool itself."""


async def create_pool(settings: Settings, **overrides: Any) -> asyncpg.Pool:
    """The worker's pool: small on purpose (a batch is one transaction on one connection); its
    connections count the statements of a batch (`statements.py`)."""
    options: dict[str, Any] = {
        "connection_class": CountingConnection,
        "min_size": settings.db_pool_min,
        "max_size": max(settings.db_pool_min, settings.db_pool_max),
        "init": _init_connection,
        "reset": _keep_session,
        "command_timeout": 60,
    }
    options.update(overrides)
    pool = await asyncpg.create_pool(settings.database_url, **options)
    assert pool is not None
    return pool


async def connect(settings: Settings, *, admin: bool = False) -> asyncpg.Connection:
    """A single connection for CLI commands (digest, replay); `admin`: the schema owner's login
    (`db migrate`, `db grant-reader`, `db revoke-reader`)."""
    con = await asyncpg.connect(settings.admin_url if admin else settings.database_url)
    await _init_connection(con)
    return con


def columns(rows: Iterable[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to column arrays, the parameters of an `unnest($1::t[], $2::t[], ...)` statement."""
    rows = list(rows)
    if not rows:
        return [[] for _ in range(width)]
    if set(map(len, rows)) != {width}:  # builtins only: a batch has thousands of rows
        raise ValueError(f"a row is not {width} values wide")
    return list(map(list, zip(*rows, strict=True)))


@dataclass(frozen=True)
class Unnest:
    """The columns of an `unnest($1::t[], $2::t[], ...) AS k (a, b, ...)` row source, declared
    once: the SQL and the parameter order come from the same list, so they cannot drift apart.
    Column names are the attribute names of the objects written (`params_of`)."""

    declared: tuple[tuple[str, str], ...]
    """(name, PostgreSQL element type)"""

    @classmethod
    def of(cls, *declared: str) -> Unnest:
        """`Unnest.of("id uuid", "tenant_id uuid", ...)`."""
        if len(declared) < 2:
            raise ValueError("an unnest row source has two columns or more")  # attrgetter's tuples
        return cls(tuple((name, pg_type) for name, pg_type in (d.split(maxsplit=1) for d in declared)))

    @property
    def names(self) -> str:
        return ", ".join(name for name, _ in self.declared)

    def selected(self, **casts: str) -> str:
        """The names for a `SELECT` list, those named in `casts` cast (`payload="jsonb"`: a column
        sent as text and stored as jsonb)."""
        unknown = set(casts) - {name for name, _ in self.declared}
        if unknown:
            raise ValueError(f"not declared: {sorted(unknown)}")
        return ", ".join(f"{name}::{casts[name]}" if name in casts else name for name, _ in self.declared)

    @property
    def source(self) -> str:
        """`unnest(...) AS k (...)`, for a statement's FROM."""
        arrays = ", ".join(f"${i}::{pg_type}[]" for i, (_, pg_type) in enumerate(self.declared, 1))
        return f"unnest({arrays}) AS k ({self.names})"

    def numbered_source(self, ordinal: str) -> str:
        """`source` with each row's place in the arrays (1, 2, ...) as column `ordinal`."""
        arrays = ", ".join(f"${i}::{pg_type}[]" for i, (_, pg_type) in enumerate(self.declared, 1))
        return f"unnest({arrays}) WITH ORDINALITY AS k ({self.names}, {ordinal})"

    def params(self, rows: Iterable[tuple[object, ...]]) -> list[list[object]]:
        return columns(rows, len(self.declared))

    def params_of(self, items: Iterable[object]) -> list[list[object]]:
        """The column arrays of objects that carry every declared column as an attribute."""
        return self.params(map(attrgetter(*(name for name, _ in self.declared)), items))


async def ping(con: asyncpg.Connection) -> None:
    """One round trip: the server answers (the read API's /ready, the bench's calibration)."""
    await con.fetchval("SELECT 1")


async def server_settings(con: asyncpg.Connection, names: Iterable[str]) -> dict[str, str]:
    """`SHOW` of each of `names` (constants of the caller's, never input: SHOW takes no parameter)."""
    return {name: str(await con.fetchval(f"SHOW {name}")) for name in names}
