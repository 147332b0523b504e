"""`minichat digest`: one sha256 of the stored state (docs/contract.md, "Guarantees").

What is covered: the tables of `DIGEST_TABLES` (`chats`, `chat_turns`, `messages`,
`quota_usage`, `turn_decisions`, the `outbox` payloads and `quota_alerts`), every column except the
processing-clock ones. The column lists are read from `information_schema` in ordinal order, so a
column added by a later migration is covered without touching this module; a processing-clock
column is recognised by its name (`*_seen_at`, `*_sent_at`, `published_at`, the schema's
convention) and left out, as is `outbox.id` (a sequence: it depends on commit order, not on the
log). `policy_versions` (operator configuration, stored at start) and `parked_events` (transient
bookkeeping) are not state and are not covered.

Canonical form, so two databases with the same logical content give the same digest whatever
their physical row order, insertion order or session settings:

* rows in primary-key order (the outbox: `dedupe_key`), text keys compared with `COLLATE "C"`
  (bytewise, independent of the database's collation);
* each row serialised inside Postgres as `to_json(ROW(col, ...))::text`, with `TimeZone`,
  `IntervalStyle` and `bytea_output` fixed for the transaction (timestamptz text depends on the
  session time zone); jsonb values print in jsonb's canonical text (keys sorted, no duplicates);
* per table: sha256 over a header line (table and column names, so a renamed or new column
  changes it) and one line per row; JSON text holds no raw newline, so lines cannot run together;
* the total: sha256 over `"{table} {table digest}\\n"` for the tables in `DIGEST_TABLES` order.

Rows are streamed through a cursor and hashed in Python: no `string_agg` of a whole table, so the
size of a table is no limit. Everything is read in one REPEATABLE READ, read-only transaction: one
snapshot for all tables.

Tenancy: the digest is an operator command over all tenants (the one place, with the outbox
relay's scan, that reads across tenants). It exposes no row content, only hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg

SYSTEM_LEVEL: Final = (
    "`minichat digest` hashes the state of all tenants (an operator command; hashes out, no content)"
)

# Table -> explicit row order, or None for "the primary key". The outbox's key is its sequence,
# which is left out of the digest, so its rows are ordered by their natural key.
DIGEST_TABLES: Mapping[str, tuple[str, ...] | None] = {
    "chats": None,
    "chat_turns": None,
    "messages": None,
    "quota_usage": None,
    "turn_decisions": None,
    "outbox": ("dedupe_key",),
    "quota_alerts": None,
}

# Processing-clock columns follow a naming convention (see the migration's header).
PROCESSING_CLOCK_SUFFIXES = ("_seen_at", "_sent_at", "published_at")

# Columns that are not processing clock but still differ between two runs of the same log.
EXCLUDED_COLUMNS: Mapping[str, frozenset[str]] = {
    "outbox": frozenset({"id"}),  # bigserial: commit order, not content
}

# Fixed for the digest's transaction: the text forms that depend on session settings.
_SESSION = (
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL IntervalStyle = 'iso_8601'",
    "SET LOCAL bytea_output = 'hex'",
    "SET LOCAL extra_float_digits = 1",
)

_TEXT_TYPES = frozenset({"text", "character varying", "character", "name", "citext"})

_COLUMNS = """
SELECT column_name::text AS name, data_type::text AS type
FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = $1
ORDER BY ordinal_position
"""

_PRIMARY_KEY = """
SELECT a.attname::text
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, n) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass(quote_ident(current_schema()) || '.' || quote_ident($1))
  AND i.indisprimary
ORDER BY k.n
"""


class DigestError(RuntimeError):
    """The schema is not what the digest needs (not migrated, or a table without a usable key)."""


@dataclass(frozen=True, slots=True)
class Digest:
    total: str
    tables: dict[str, str]


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How one table is read: covered columns (ordinal order) and the row order."""

    table: str
    columns: tuple[str, ...]
    order_by: tuple[str, ...]
    text_columns: frozenset[str] = frozenset()

    def header(self) -> bytes:
        return json.dumps([self.table, list(self.columns)], separators=(",", ":")).encode() + b"\n"

    def row_sql(self) -> str:
        """One text per row, in canonical order."""
        return f"SELECT {row_expression(self.columns)} FROM {_ident(self.table)} ORDER BY {self._order()}"

    def _order(self) -> str:
        return ", ".join(
            f'{_ident(c)} COLLATE "C"' if c in self.text_columns else _ident(c) for c in self.order_by
        )


def is_processing_clock(column: str) -> bool:
    return column.endswith(PROCESSING_CLOCK_SUFFIXES)


def covered_columns(table: str, columns: Iterable[str]) -> tuple[str, ...]:
    """The columns of `table` (given in ordinal order) that the digest covers."""
    excluded = EXCLUDED_COLUMNS.get(table, frozenset())
    return tuple(c for c in columns if not is_processing_clock(c) and c not in excluded)


def row_expression(columns: Sequence[str], alias: str | None = None) -> str:
    """SQL of a row's canonical text: a JSON object `{"f1": value, "f2": ...}` of the columns."""
    if not columns:
        raise DigestError("no columns to digest")
    prefix = f"{_ident(alias)}." if alias else ""
    # ROW(...) rather than json_build_array(...): a function takes at most 100 arguments.
    return f"to_json(ROW({', '.join(prefix + _ident(c) for c in columns)}))::text"


def combine(tables: Mapping[str, str]) -> str:
    """The total digest of the per-table digests, in the given (canonical) table order."""
    h = hashlib.sha256()
    for table, value in tables.items():
        h.update(f"{table} {value}\n".encode())
    return h.hexdigest()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def table_spec(
    con: asyncpg.Connection, table: str, order_by: tuple[str, ...] | None = None
) -> TableSpec:
    """Read a table's covered columns and canonical order from the catalog."""
    rows = await con.fetch(_COLUMNS, table)
    if not rows:
        raise DigestError(f"table {table} does not exist: run `minichat db migrate`")
    all_columns = [r["name"] for r in rows]
    columns = covered_columns(table, all_columns)
    if order_by is None:
        order_by = tuple(r[0] for r in await con.fetch(_PRIMARY_KEY, table))
    if not order_by or any(c not in columns for c in order_by):
        raise DigestError(f"table {table}: row order {list(order_by)} is not a set of covered columns")
    text_columns = frozenset(r["name"] for r in rows if r["type"] in _TEXT_TYPES)
    return TableSpec(table, columns, order_by, text_columns)


async def table_digest(con: asyncpg.Connection, spec: TableSpec, *, prefetch: int = 2000) -> str:
    """sha256 of one table (the caller holds the transaction and the session settings)."""
    h = hashlib.sha256(spec.header())
    async for row in con.cursor(spec.row_sql(), prefetch=prefetch):
        h.update(row[0].encode())
        h.update(b"\n")
    return h.hexdigest()


async def digest(con: asyncpg.Connection) -> Digest:
    """The digest of the stored state over all tenants, from one consistent snapshot."""
    tables: dict[str, str] = {}
    async with con.transaction(isolation="repeatable_read", readonly=True):
        for statement in _SESSION:
            await con.execute(statement)
        for table, order_by in DIGEST_TABLES.items():
            spec = await table_spec(con, table, order_by)
            tables[table] = await table_digest(con, spec)
    return Digest(total=combine(tables), tables=tables)
