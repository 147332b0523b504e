"""The digest's pure parts: which columns it covers, how a row is written, how tables combine."""

from __future__ import annotations

import hashlib

import pytest

from minichat.storage.digest import (
    DIGEST_TABLES,
    TableSpec,
    combine,
    covered_columns,
    is_processing_clock,
    row_expression,
)


def test_contract_tables_in_a_fixed_order() -> None:
    assert list(DIGEST_TABLES) == [
        "chats",
        "chat_turns",
        "messages",
        "quota_usage",
        "turn_decisions",
        "outbox",
        "quota_alerts",
    ]
    assert DIGEST_TABLES["outbox"] == ("dedupe_key",)  # its primary key (a sequence) is not content


@pytest.mark.parametrize(
    "column",
    ["last_progress_seen_at", "terminal_seen_at", "orphan_sent_at", "grace_sent_at", "published_at",
     "parked_seen_at"],
)  # fmt: skip
def test_processing_clock_columns_are_recognised_by_name(column: str) -> None:
    assert is_processing_clock(column)


@pytest.mark.parametrize(
    "column",
    ["created_at", "updated_at", "deleted_at", "started_at", "terminal_at", "settled_at", "adjusted_at",
     "last_progress_at", "completed_at", "decided_at", "seen", "sent", "published"],
)  # fmt: skip
def test_event_time_columns_are_covered(column: str) -> None:
    assert not is_processing_clock(column)


def test_covered_columns_keep_ordinal_order_and_drop_outbox_id() -> None:
    outbox = ["id", "tenant_id", "dedupe_key", "event_type", "payload", "created_at", "published_at"]
    kept = ("tenant_id", "dedupe_key", "event_type", "payload", "created_at")
    assert covered_columns("outbox", outbox) == kept
    turns = ["id", "state", "last_progress_seen_at", "terminal_at", "terminal_seen_at", "orphan_sent_at", "x"]
    assert covered_columns("chat_turns", turns) == ("id", "state", "terminal_at", "x")
    # `id` is only excluded where it is a sequence
    assert covered_columns("chats", ["id", "tenant_id"]) == ("id", "tenant_id")


def test_row_expression_quotes_identifiers() -> None:
    assert row_expression(["a", 'we"ird']) == 'to_json(ROW("a", "we""ird"))::text'
    assert row_expression(["a"], "t") == 'to_json(ROW("t"."a"))::text'
    with pytest.raises(RuntimeError):
        row_expression([])


def test_row_order_is_bytewise_for_text_keys() -> None:
    spec = TableSpec("outbox", ("tenant_id", "dedupe_key"), ("dedupe_key",), frozenset({"dedupe_key"}))
    assert spec.row_sql().endswith('ORDER BY "dedupe_key" COLLATE "C"')
    spec = TableSpec("turn_decisions", ("chat_id", "command_id"), ("chat_id", "command_id"))
    assert spec.row_sql().endswith('ORDER BY "chat_id", "command_id"')


def test_header_names_the_table_and_its_columns() -> None:
    a = TableSpec("chats", ("id", "title"), ("id",))
    b = TableSpec("chats", ("id", "title", "new_column"), ("id",))
    assert a.header() == b'["chats",["id","title"]]\n'
    assert a.header() != b.header()  # a new column changes the digest even while it is all NULL


def test_combine_depends_on_every_table_and_the_order() -> None:
    tables = {"chats": "aa", "outbox": "bb"}
    total = combine(tables)
    assert total == hashlib.sha256(b"chats aa\noutbox bb\n").hexdigest()
    assert combine({"chats": "aa", "outbox": "bc"}) != total
    assert combine({"outbox": "bb", "chats": "aa"}) != total
    assert len(total) == 64 and int(total, 16) >= 0
