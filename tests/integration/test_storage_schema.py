"""Migrations against a real PostgreSQL: idempotent, recorded, and shaped as docs/contract.md, "Storage"."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import asyncpg
import pytest

from minichat.storage.schema import MigrationError, available_migrations, migrate, pending_migrations
from tests.support import run_cli

pytestmark = pytest.mark.integration

CONTRACT_TABLES = {
    "chats",
    "chat_turns",
    "messages",
    "quota_usage",
    "turn_decisions",
    "policy_versions",
    "outbox",
    "parked_events",
}


async def test_migrations_apply_twice(empty_database_url: str) -> None:
    con = await asyncpg.connect(empty_database_url)
    try:
        assert [m.version for m in await pending_migrations(con)] == [
            m.version for m in available_migrations()
        ]
        first = await migrate(con)
        second = await migrate(con)
        assert [m.version for m in first] == [m.version for m in available_migrations()]
        assert second == []
        assert await pending_migrations(con) == []
        recorded = await con.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["checksum"]) for r in recorded] == [
            (m.version, m.checksum) for m in available_migrations()
        ]
    finally:
        await con.close()


async def test_changed_migration_is_refused(empty_database_url: str) -> None:
    con = await asyncpg.connect(empty_database_url)
    try:
        await migrate(con)
        await con.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(con)
    finally:
        await con.close()


async def test_db_migrate_says_why_it_refuses(empty_database_url: str) -> None:
    """An operator who starts an older minichat on a newer database reads why, not a class name."""
    con = await asyncpg.connect(empty_database_url)
    try:
        await migrate(con)
        await con.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'from_the_future', 'x')"
        )
    finally:
        await con.close()
    result = run_cli({"MINICHAT_DATABASE_URL": empty_database_url}, "db", "migrate")
    assert result.returncode == 2, result.stderr
    assert "database has migration 9999, which this minichat does not know" in result.stderr
    assert "schema is up to date" not in result.stdout


async def test_every_table_carries_the_tenant(database_url: str) -> None:
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch(
            """
            SELECT t.table_name, bool_or(c.column_name = 'tenant_id') AS has_tenant
            FROM information_schema.tables t
            JOIN information_schema.columns c USING (table_schema, table_name)
            WHERE t.table_schema = 'public' AND t.table_type = 'BASE TABLE'
            GROUP BY t.table_name
            """
        )
    finally:
        await con.close()
    tables = {r["table_name"]: r["has_tenant"] for r in rows}
    assert set(tables) >= CONTRACT_TABLES
    # Operator tables name no tenant: the migrations ledger, the consumer group's input offsets and
    # the applied order of the partition sets (offset ranges, relayed to `order-log`).
    assert {name for name, has in tables.items() if not has} == {
        "schema_migrations",
        "consumer_positions",
        "order_log",
    }


async def _chat_and_turn(con: asyncpg.Connection, *, request_id: uuid.UUID | None = None) -> uuid.UUID:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    await con.execute(
        "INSERT INTO chats (id, tenant_id, user_id, model, created_at, updated_at)"
        " VALUES ($1, $2, $3, 'm', $4, $4)",
        chat,
        tenant,
        user,
        now,
    )
    await _turn(con, tenant, chat, request_id or uuid.uuid4())
    return chat


async def _turn(con: asyncpg.Connection, tenant: uuid.UUID, chat: uuid.UUID, request_id: uuid.UUID) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    await con.execute(
        """
        INSERT INTO chat_turns (id, tenant_id, chat_id, request_id, requester_type, state, selected_model,
            effective_model, reserve_tokens, max_output_tokens_applied, reserved_credits_micro,
            policy_version_applied, minimal_generation_floor_applied, period_daily, period_monthly,
            started_at, updated_at)
        VALUES ($1, $2, $3, $4, 'user', 'running', 'm', 'm', 10, 5, 1, 1, 1, $5, $6, $7, $7)
        """,
        uuid.uuid4(),
        tenant,
        chat,
        request_id,
        date(2026, 1, 1),
        date(2026, 1, 1),
        now,
    )


async def test_constraints_hold(database_url: str) -> None:
    con = await asyncpg.connect(database_url)
    try:
        chat = await _chat_and_turn(con)
        tenant = await con.fetchval("SELECT tenant_id FROM chats WHERE id = $1", chat)
        # one running live turn per chat
        with pytest.raises(asyncpg.UniqueViolationError):
            await _turn(con, tenant, chat, uuid.uuid4())
        # unique (chat_id, request_id), even once terminal
        request_id = await con.fetchval("SELECT request_id FROM chat_turns WHERE chat_id = $1", chat)
        await con.execute(
            "UPDATE chat_turns SET state = 'completed', completed_at = started_at WHERE chat_id = $1", chat
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await _turn(con, tenant, chat, request_id)
        # quota counters never go negative; natural key is unique
        user = uuid.uuid4()
        insert_row = """
            INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket,
                reserved_credits_micro, updated_at)
            VALUES ($1, $2, $3, 'daily', '2026-01-01', 'total', $4, now())
        """
        with pytest.raises(asyncpg.CheckViolationError):
            await con.execute(insert_row, uuid.uuid4(), tenant, user, -1)
        await con.execute(insert_row, uuid.uuid4(), tenant, user, 0)
        with pytest.raises(asyncpg.UniqueViolationError):
            await con.execute(insert_row, uuid.uuid4(), tenant, user, 0)
        # one live message per (chat, request, role)
        insert_message = """
            INSERT INTO messages (id, tenant_id, chat_id, request_id, role, content, created_at)
            VALUES ($1, $2, $3, $4, 'user', 'hi', now())
        """
        await con.execute(insert_message, uuid.uuid4(), tenant, chat, request_id)
        with pytest.raises(asyncpg.UniqueViolationError):
            await con.execute(insert_message, uuid.uuid4(), tenant, chat, request_id)
    finally:
        await con.close()


async def test_one_running_turn_per_chat_without_an_index_on_state(database_url: str) -> None:
    """The rule the unique partial index kept, kept by a trigger (migration 0012) so that no index
    of `chat_turns` names `state`: a second running live turn is refused as a unique violation,
    inserted alone, in one statement with the first, or by an update; a deleted one does not count."""
    con = await asyncpg.connect(database_url)
    try:
        chat = await _chat_and_turn(con)
        tenant = await con.fetchval("SELECT tenant_id FROM chats WHERE id = $1", chat)
        indexed = await con.fetch(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'chat_turns' AND indexdef ~ 'state|_seen_at'"
        )
        assert indexed == []
        # one statement inserting two running turns of a new chat
        other = await _chat_and_turn(con)
        await con.execute("DELETE FROM chat_turns WHERE chat_id = $1", other)
        with pytest.raises(asyncpg.UniqueViolationError):
            await con.execute(
                """
                INSERT INTO chat_turns (id, tenant_id, chat_id, request_id, requester_type, state,
                    selected_model, effective_model, reserve_tokens, max_output_tokens_applied,
                    reserved_credits_micro, policy_version_applied, minimal_generation_floor_applied,
                    period_daily, period_monthly, started_at, updated_at)
                SELECT gen_random_uuid(), $1, $2, gen_random_uuid(), 'user', 'running', 'm', 'm', 10, 5,
                    1, 1, 1, '2026-01-01', '2026-01-01', now(), now()
                FROM generate_series(1, 2)
                """,
                tenant,
                other,
            )
        # a finished turn made running again while another runs
        await con.execute(
            "UPDATE chat_turns SET state = 'completed', completed_at = started_at WHERE chat_id = $1", chat
        )
        await _turn(con, tenant, chat, uuid.uuid4())
        with pytest.raises(asyncpg.UniqueViolationError):
            await con.execute(
                "UPDATE chat_turns SET state = 'running', completed_at = NULL"
                " WHERE chat_id = $1 AND state = 'completed'",
                chat,
            )
        # a deleted running turn is not live: the chat may start another
        await con.execute("UPDATE chat_turns SET deleted_at = now() WHERE chat_id = $1", chat)
        await _turn(con, tenant, chat, uuid.uuid4())
    finally:
        await con.close()
