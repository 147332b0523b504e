"""`minichat digest` against a real PostgreSQL: what it covers and what it ignores
(docs/contract.md, "Guarantees").

The rows are generated from the catalog (every column of every covered table, by data type), so a
column added by a later migration is exercised here without editing this file; an unknown data
type fails loudly. Constraints are dropped in these throwaway databases so any column can be
changed on its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from minichat.storage.digest import DIGEST_TABLES, Digest, combine, covered_columns, digest
from tests.conftest import Deployment, deployment_settings
from tests.support import Endpoints, run_cli, scratch_database

pytestmark = pytest.mark.integration

NS = uuid.UUID("0b5c1e43-7f0e-4d59-9f1a-3c2d7c7f5e10")
ROWS = 3

# The processing-clock columns of the schema today, plus the outbox's sequence
# (docs/contract.md, "Storage").
EXPECTED_EXCLUDED = {
    ("chat_turns", "last_progress_seen_at"),
    ("chat_turns", "terminal_seen_at"),
    ("chat_turns", "orphan_sent_at"),
    ("chat_turns", "grace_sent_at"),
    ("outbox", "id"),
    ("outbox", "published_at"),
    ("outbox", "stored_seen_at"),
}


class Rollback(Exception):
    pass


async def catalog(con: asyncpg.Connection) -> dict[str, list[tuple[str, str, int | None]]]:
    """table -> [(column, data type, max length)] in ordinal order."""
    result: dict[str, list[tuple[str, str, int | None]]] = {}
    for table in DIGEST_TABLES:
        rows = await con.fetch(
            """
            SELECT column_name::text, data_type::text, character_maximum_length::int
            FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = $1
            ORDER BY ordinal_position
            """,
            table,
        )
        result[table] = [(r[0], r[1], r[2]) for r in rows]
    return result


async def drop_constraints(con: asyncpg.Connection) -> None:
    """Foreign keys and checks out of the way: any column may then change on its own."""
    rows = await con.fetch(
        """
        SELECT conrelid::regclass::text AS tbl, conname::text AS name
        FROM pg_constraint
        WHERE contype IN ('f', 'c') AND connamespace = current_schema()::regnamespace
        ORDER BY contype DESC
        """
    )
    for r in rows:
        await con.execute(f'ALTER TABLE {r["tbl"]} DROP CONSTRAINT "{r["name"]}"')


def value_for(table: str, column: str, kind: str, length: int | None, i: int, variant: bool) -> Any:
    """Row i's value; `variant` spells the same value differently (time zone, JSON key order)."""
    if kind == "uuid":
        return uuid.uuid5(NS, f"{table}.{column}.{i}")
    if kind in ("text", "character varying", "character"):
        text = f"{column[:6]}-{i}-ü"  # non-ASCII on purpose
        return text[: length or None]
    if kind in ("integer", "bigint", "smallint"):
        return 10 + i
    if kind == "boolean":
        return i % 2 == 0
    if kind == "date":
        return date(2025, 1, 1) + timedelta(days=i)
    if kind == "timestamp with time zone":
        # non-UTC offsets going in: the stored instant is what counts
        hours = -5 if variant else 2
        at = datetime(2025, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))) + timedelta(
            seconds=i, microseconds=i
        )
        return at.astimezone(timezone(timedelta(hours=hours)))
    if kind == "jsonb":
        if variant:
            return f'{{"n":2.50,"a":[1,"\\u00fc",{{"k":null}}],  "z":{i}}}'
        return f'{{"z": {i}, "a": [1, "ü", {{"k": null}}], "n": 2.50}}'
    pytest.fail(f"{table}.{column}: no test value for type {kind}: teach value_for() about it")


async def fill(con: asyncpg.Connection, *, reverse: bool = False, id_offset: int = 0) -> None:
    """ROWS rows in every covered table; `reverse` inserts tables and rows in the opposite order."""
    tables = await catalog(con)
    order = list(tables.items())
    for table, cols in reversed(order) if reverse else order:
        names = ", ".join(f'"{c}"' for c, _, _ in cols)
        params = ", ".join(f"${n}" for n in range(1, len(cols) + 1))
        statement = f'INSERT INTO "{table}" ({names}) VALUES ({params})'
        indexes = range(ROWS - 1, -1, -1) if reverse else range(ROWS)
        for i in indexes:
            values = [value_for(table, c, k, n, i, reverse) for c, k, n in cols]
            if table == "outbox":  # the sequence: differs between the two databases
                values[[c for c, _, _ in cols].index("id")] = 1000 * id_offset + (
                    ROWS - i if reverse else i + 1
                )
            await con.execute(statement, *values)


def mutation(column: str, kind: str) -> str:
    """An SQL expression that is different from the column's current value, whatever it is."""
    c = f'"{column}"'
    if column == "id" and kind == "bigint":  # a sequence: renumber clear of the other rows
        return f"{c} + 1000000"
    return {
        "uuid": "gen_random_uuid()",
        "text": f"CASE WHEN {c} IS DISTINCT FROM 'z' THEN 'z' ELSE 'y' END",
        "character varying": f"CASE WHEN {c} IS DISTINCT FROM 'z' THEN 'z' ELSE 'y' END",
        "character": f"CASE WHEN {c} IS DISTINCT FROM 'z' THEN 'z' ELSE 'y' END",
        "integer": f"coalesce({c} + 1, 0)",
        "bigint": f"coalesce({c} + 1, 0)",
        "smallint": f"coalesce({c} + 1, 0)",
        "boolean": f"coalesce(NOT {c}, true)",
        "date": f"coalesce({c} + 1, DATE '2000-01-01')",
        "timestamp with time zone": f"coalesce({c} + interval '1 microsecond', TIMESTAMPTZ '2000-01-01Z')",
        "jsonb": f"""coalesce({c}, '{{}}'::jsonb) || '{{"~": 1}}'::jsonb""",
    }[kind]


async def digest_with(con: asyncpg.Connection, table: str, column: str, kind: str) -> Digest:
    """The digest with one column of one row changed; the change is rolled back."""
    result: Digest | None = None
    try:
        async with con.transaction(isolation="repeatable_read"):
            await con.execute(
                f'UPDATE "{table}" SET "{column}" = {mutation(column, kind)} '
                f'WHERE ctid = (SELECT ctid FROM "{table}" ORDER BY ctid LIMIT 1)'
            )
            result = await digest(con)
            raise Rollback
    except Rollback:
        pass
    assert result is not None
    return result


@pytest.fixture
async def filled(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(database_url)
    try:
        await drop_constraints(con)
        await fill(con)
        yield con
    finally:
        await con.close()


@pytest.fixture
async def second_database_url(endpoints: Endpoints, template_database: str) -> AsyncIterator[str]:
    async with scratch_database(endpoints.database_url, "d", template=template_database) as url:
        yield url


async def test_digest_is_stable_and_covers_the_contract_tables(filled: asyncpg.Connection) -> None:
    first = await digest(filled)
    second = await digest(filled)
    assert first == second
    assert list(first.tables) == list(DIGEST_TABLES)
    assert first.total == combine(first.tables)
    assert all(len(v) == 64 for v in [first.total, *first.tables.values()])
    await filled.execute("DELETE FROM outbox")
    assert (await digest(filled)).total != first.total


async def test_the_excluded_columns_are_the_processing_clock_ones(filled: asyncpg.Connection) -> None:
    tables = await catalog(filled)
    excluded = {
        (table, c)
        for table, cols in tables.items()
        for c, _, _ in cols
        if c not in covered_columns(table, [c for c, _, _ in cols])
    }
    assert excluded == EXPECTED_EXCLUDED


async def test_every_covered_column_changes_the_digest(filled: asyncpg.Connection) -> None:
    base = await digest(filled)
    checked = 0
    for table, cols in (await catalog(filled)).items():
        covered = covered_columns(table, [c for c, _, _ in cols])
        for column, kind, _ in cols:
            if column not in covered:
                continue
            changed = await digest_with(filled, table, column, kind)
            assert changed.total != base.total, f"{table}.{column} is not covered"
            assert changed.tables[table] != base.tables[table], f"{table}.{column}"
            assert {t: v for t, v in changed.tables.items() if t != table} == {
                t: v for t, v in base.tables.items() if t != table
            }
            checked += 1
    assert await digest(filled) == base  # every change was rolled back
    assert checked > 90


async def test_processing_clock_columns_do_not_change_the_digest(filled: asyncpg.Connection) -> None:
    base = await digest(filled)
    kinds = {(t, c): k for t, cols in (await catalog(filled)).items() for c, k, _ in cols}
    for table, column in sorted(EXPECTED_EXCLUDED):
        # (outbox.id included: a re-numbered outbox is the same outbox)
        assert (await digest_with(filled, table, column, kinds[(table, column)])) == base, f"{table}.{column}"
    # nor do tables outside the contract's list
    await filled.execute(
        """
        INSERT INTO parked_events (tenant_id, chat_id, request_id, source_topic, source_partition,
                                   source_offset, event_type, payload, record_timestamp)
        VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'x', 0, 1, 'turn.progress',
                '\\x00', now())
        """
    )
    assert await digest(filled) == base


async def test_same_content_in_another_order_and_time_zone_gives_the_same_digest(
    filled: asyncpg.Connection, second_database_url: str
) -> None:
    other = await asyncpg.connect(second_database_url)
    try:
        await drop_constraints(other)
        await fill(other, reverse=True, id_offset=7)
        ids = {r[0] for r in await filled.fetch("SELECT id FROM outbox")}
        assert ids.isdisjoint({r[0] for r in await other.fetch("SELECT id FROM outbox")})
        await other.execute("SET TimeZone = 'America/New_York'")
        await other.execute("SET DateStyle = 'SQL, DMY'")
        await other.execute("SET IntervalStyle = 'postgres_verbose'")
        assert await digest(other) == await digest(filled)
        # and one changed value anywhere tells them apart
        await other.execute(
            "UPDATE messages SET content = content || '.' WHERE ctid = (SELECT min(ctid) FROM messages)"
        )
        assert (await digest(other)).tables["messages"] != (await digest(filled)).tables["messages"]
    finally:
        await other.close()


async def test_cli_prints_the_total_or_every_table(
    endpoints: Endpoints, database_url: str, filled: asyncpg.Connection
) -> None:
    env = Deployment(deployment_settings(endpoints, database_url)).env()
    expected = await digest(filled)
    plain = run_cli(env, "digest")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected.total + "\n"
    per_table = run_cli(env, "digest", "--tables")
    assert per_table.returncode == 0, per_table.stderr
    lines = [line.split() for line in per_table.stdout.splitlines()]
    assert lines == [[t, v] for t, v in expected.tables.items()] + [["total", expected.total]]


async def test_cli_names_the_fix_on_an_empty_database(endpoints: Endpoints, empty_database_url: str) -> None:
    env = Deployment(deployment_settings(endpoints, empty_database_url)).env()
    result = run_cli(env, "digest")
    assert result.returncode == 2
    assert "run `minichat db migrate`" in result.stderr
