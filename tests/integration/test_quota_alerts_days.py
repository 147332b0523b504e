"""Budget alerts across two days (docs/contract.md, "quota.threshold_crossed"): a user whose turns
settle across 50/80/100 % on day D and again on day D+1 gets exactly six alerts, in order, with the
contract's ids; applying the same records again (what `minichat replay` over the live database
does) adds no outbox row; and a rebuild into an empty database, cut into other batches, derives the
same alert rows.

The day is the record timestamp (LogAppendTime), which a live broker chooses, so the records are
applied by the engine's own batches with explicit timestamps on real PostgreSQL (as
test_read_api_order.py does). The kill-mid-run half of the issue's test is
test_quota_alerts_crash.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from minichat.domain.ids import ID_NAMESPACE
from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.batches import MergedBatches
from minichat.processors.pipeline import Decoded
from minichat.processors.records import SourceRecord
from minichat.storage.db import connect
from minichat.storage.policies import ensure_policy_version
from tests.conftest import deployment_settings
from tests.gateway import Gateway, policy_file
from tests.support import Endpoints, db_digest, scratch_database

pytestmark = pytest.mark.integration

LIMIT = 1_000_000
DAY = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
CHARGES = (400_001, 149_999, 300_001, 200_001)
"""40 %: nothing; 55 %: 50; 85 %: 80; 105 %: 100 (of the daily LIMIT; gpt-5-mini charges
`ceil(in / 4) + 2 * out`, so 4 input tokens and (charge - 1) / 2 output tokens)."""
EXPECTED_PER_DAY = ((1, 50, 550_000), (2, 80, 850_001), (3, 100, 1_050_002))
"""(turn index, threshold, spend after it) of each day's alerts."""

ALERT_COLUMNS = (
    "tenant_id, user_id, bucket, period_type, period_start, threshold_percent, event_id,"
    " limit_credits_micro, spent_credits_micro, request_id, occurred_at"
)


def contract_id(tenant: uuid.UUID, user: uuid.UUID, day: date, threshold: int) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"alert:{tenant}:{user}:total:daily:{day}:{threshold}"))


def records(
    gw: Gateway, names: TopicNames, tenant: uuid.UUID, user: uuid.UUID
) -> tuple[list[SourceRecord], list[Any]]:
    """Both days' records in applied order (each turn: its command, then its completion half a
    second later) and the commands, day by day."""
    out: list[SourceRecord] = []
    commands: list[Any] = []
    offsets = {names.turn_requests: 0, names.provider_responses: 0}
    for day in range(2):
        for i, charge in enumerate(CHARGES):
            at = DAY + timedelta(days=day, minutes=10 * i)
            command = gw.requested(tenant, user, uuid.uuid4())
            done = gw.provider(
                "turn.completed",
                command,
                content="a",
                usage={"input_tokens": 4, "output_tokens": (charge - 1) // 2},
            )
            commands.append(command)
            for topic, event, when in (
                (names.turn_requests, command, at),
                (names.provider_responses, done, at + timedelta(milliseconds=500)),
            ):
                key = str(event["chat_id"]).encode()
                out.append(SourceRecord(topic, 0, offsets[topic], key, json.dumps(event).encode(), when))
                offsets[topic] += 1
    return out, commands


async def apply(con: asyncpg.Connection, batches: MergedBatches, batch: Sequence[SourceRecord]) -> None:
    good = [d for d in batches.decode(batch) if isinstance(d, Decoded)]
    assert len(good) == len(batch)
    async with con.transaction():
        await batches.apply(con, good)


async def alert_rows(con: asyncpg.Connection) -> list[asyncpg.Record]:
    return await con.fetch(
        f"SELECT {ALERT_COLUMNS} FROM quota_alerts ORDER BY period_start, threshold_percent"
    )


async def outbox_alerts(con: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await con.fetch(
        "SELECT payload FROM outbox WHERE event_type = 'quota.threshold_crossed' ORDER BY id"
    )
    return [dict(r["payload"]) for r in rows]


async def test_two_days_give_exactly_six_alerts_in_order_and_a_replay_adds_none(
    endpoints: Endpoints, database_url: str, template_database: str, tmp_path: Path
) -> None:
    policy_path = policy_file(
        tmp_path,
        limits={
            "standard": {"daily": LIMIT, "monthly": 10**12},
            "premium": {"daily": LIMIT, "monthly": 10**12},
        },
        overshoot_tolerance=1000.0,
    )
    settings = deployment_settings(endpoints, database_url, policy_file=policy_path)
    policy = load_policy(settings.policy_file)
    names = TopicNames(settings.topic_prefix)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
    log, commands = records(gw, names, tenant, user)

    con = await connect(settings)
    try:
        await ensure_policy_version(con, policy)
        batches = build_batches(settings, policy)
        for record in log:
            await apply(con, batches, [record])

        sent = await outbox_alerts(con)
        days = [DAY.date(), DAY.date() + timedelta(days=1)]
        expected = [
            (
                str(days[d]),
                pct,
                spent,
                commands[4 * d + i]["request_id"],
                contract_id(tenant, user, days[d], pct),
            )
            for d in range(2)
            for i, pct, spent in EXPECTED_PER_DAY
        ]
        got = [
            (
                e["period_start"],
                e["threshold_percent"],
                e["spent_credits_micro"],
                e["request_id"],
                e["event_id"],
            )
            for e in sent
        ]
        assert got == expected
        for e in sent:
            assert (e["type"], e["schema_version"], e["tenant_id"], e["user_id"]) == (
                "quota.threshold_crossed", 1, str(tenant), str(user),
            )  # fmt: skip
            assert (e["bucket"], e["period_type"], e["limit_credits_micro"]) == ("total", "daily", LIMIT)
        # occurred_at: the event time of the completion that crossed it
        crossing_times = [
            DAY + timedelta(days=d, minutes=10 * i, milliseconds=500)
            for d in range(2)
            for i, _, _ in EXPECTED_PER_DAY
        ]
        assert [datetime.fromisoformat(e["occurred_at"]) for e in sent] == crossing_times

        stored = await alert_rows(con)
        assert [(str(r["period_start"]), r["threshold_percent"], str(r["event_id"])) for r in stored] == [
            (g[0], g[1], g[4]) for g in got
        ]

        # Replay: the same records again change nothing and add no outbox row.
        outbox_before = await con.fetchval("SELECT count(*) FROM outbox")
        digest_before = await db_digest(settings.database_url)
        for record in log:
            await apply(con, batches, [record])
        assert await con.fetchval("SELECT count(*) FROM outbox") == outbox_before
        assert await outbox_alerts(con) == sent
        assert await alert_rows(con) == stored
        assert await db_digest(settings.database_url) == digest_before
    finally:
        await con.close()

    # Rebuild into an empty database, one batch per day: the same alert rows, the same books.
    async with scratch_database(endpoints.database_url, "r", template=template_database) as url:
        rebuilt = await connect(settings.model_copy(update={"database_url": url}))
        try:
            await ensure_policy_version(rebuilt, policy)
            fresh = build_batches(settings, policy)
            half = len(log) // 2
            for batch in (log[:half], log[half:]):
                await apply(rebuilt, fresh, batch)
            assert await alert_rows(rebuilt) == stored
            assert await outbox_alerts(rebuilt) == sent
        finally:
            await rebuilt.close()
        assert await db_digest(url) == digest_before
