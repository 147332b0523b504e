"""Row versions a turn costs (docs/architecture.md, "Provider and usage events"): a turn whose
command and events are applied in one batch is written once, as it ends up, and equals the turn
written step by step; a turn's later progress and terminal updates are HOT (migration 0012). The
records go through the engine's own batches (`MergedBatches.apply`) on PostgreSQL; the counts are
the transaction's own (`pg_stat_xact_user_tables`)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.batches import MergedBatches
from minichat.processors.pipeline import Decoded
from minichat.processors.records import SourceRecord
from minichat.storage.db import connect
from minichat.storage.policies import ensure_policy_version
from tests.conftest import deployment_settings
from tests.gateway import Event, Gateway
from tests.support import Endpoints

pytestmark = pytest.mark.integration

AT = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
# every column the batch decides (ids, and the processing clock, differ between the two chats)
_SKIPPED = {
    "id",
    "chat_id",
    "request_id",
    "assistant_message_id",
    "last_progress_seen_at",
    "terminal_seen_at",
}


_COUNTS = (
    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
    " WHERE relname IN ('chat_turns', 'messages')"
)


async def _counts(con: asyncpg.Connection) -> dict[str, tuple[int, int, int]]:
    rows = await con.fetch(_COUNTS)
    return {r["relname"]: (r["n_tup_ins"], r["n_tup_upd"], r["n_tup_hot_upd"]) for r in rows}


async def apply(
    con: asyncpg.Connection, batches: MergedBatches, records: list[SourceRecord]
) -> dict[str, tuple[int, ...]]:
    """Apply `records` as one batch; the transaction's (inserted, updated, HOT-updated) by table
    (a difference: the view may still hold the backend's earlier transactions, not reported yet)."""
    good = [d for d in batches.decode(records) if isinstance(d, Decoded)]
    assert len(good) == len(records)
    async with con.transaction():
        before = await _counts(con)
        await batches.apply(con, good)
        after = await _counts(con)
    zero = (0, 0, 0)
    return {
        table: tuple(a - b for a, b in zip(n, before.get(table, zero), strict=True))
        for table, n in after.items()
    }


class Turn:
    """One turn's records on the three input topics, one second apart."""

    def __init__(self, names: TopicNames, gw: Gateway, tenant: uuid.UUID, user: uuid.UUID) -> None:
        self.chat = uuid.uuid4()
        self.command = gw.requested(tenant, user, self.chat, content="question")
        self.facts = [
            (names.provider_responses, gw.provider("turn.progress", self.command)),
            (names.provider_responses, gw.provider("turn.completed", self.command, content="answer")),
            (names.usage, gw.usage(self.command, 30, 40)),
        ]
        self.names = names

    def records(self) -> list[SourceRecord]:
        events: list[tuple[str, Event]] = [(self.names.turn_requests, self.command), *self.facts]
        return [
            SourceRecord(
                topic, 0, i, str(self.chat).encode(), json.dumps(event).encode(), AT + timedelta(seconds=i)
            )
            for i, (topic, event) in enumerate(events)
        ]


async def _row(
    con: asyncpg.Connection, table: str, chat: uuid.UUID, role: str | None = None
) -> dict[str, Any]:
    where = " AND role = $2" if role else ""
    found = await con.fetch(
        f"SELECT * FROM {table} WHERE chat_id = $1{where}", chat, *([role] if role else [])
    )
    assert len(found) == 1
    return {k: v for k, v in dict(found[0]).items() if k not in _SKIPPED}


async def test_a_turn_applied_in_one_batch_is_written_once_and_as_step_by_step(
    endpoints: Endpoints, database_url: str
) -> None:
    settings = deployment_settings(endpoints, database_url)
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    batches = build_batches(settings, policy)
    gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
    tenant, user = uuid.uuid4(), uuid.uuid4()
    whole, stepwise = Turn(names, gw, tenant, user), Turn(names, gw, tenant, user)
    con = await connect(settings)
    try:
        await ensure_policy_version(con, policy)
        counts = await apply(con, batches, whole.records())
        # the turn inserted settled; the assistant message with its usage: no update at all
        assert counts["chat_turns"] == (1, 0, 0)
        assert counts["messages"] == (2, 0, 0)

        # the same turn record by record: insert, then an update per event
        per_record = [await apply(con, batches, [r]) for r in stepwise.records()]
        assert sum(c.get("chat_turns", (0, 0, 0))[1] for c in per_record) == 3
        progress, terminal, settlement = (c["chat_turns"] for c in per_record[1:])
        # progress and the terminal event (usage still to come) change no indexed column: HOT
        assert progress == (0, 1, 1)
        assert terminal == (0, 1, 1)
        assert settlement == (0, 1, 0)  # the turn leaves the watchdog's open set

        for table, role in (("chat_turns", None), ("messages", "user"), ("messages", "assistant")):
            assert await _row(con, table, whole.chat, role) == await _row(con, table, stepwise.chat, role)
        settled = await con.fetchrow(
            "SELECT state, settlement_method, usage_known, output_tokens, turn_seq"
            " FROM chat_turns WHERE chat_id = $1",
            whole.chat,
        )
        assert tuple(settled) == ("completed", "actual", True, 40, 1)
    finally:
        await con.close()


async def test_written_as_it_goes_without_holding(endpoints: Endpoints, database_url: str) -> None:
    """A rebuild's path (`tools/rebuild`: `hold_turns=False`) writes each step's turns at once."""
    settings = deployment_settings(endpoints, database_url)
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    batches = dataclasses.replace(build_batches(settings, policy), hold_turns=False)
    gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
    turn = Turn(names, gw, uuid.uuid4(), uuid.uuid4())
    con = await connect(settings)
    try:
        await ensure_policy_version(con, policy)
        counts = await apply(con, batches, turn.records())
        assert counts["chat_turns"][:2] == (1, 1)
    finally:
        await con.close()
