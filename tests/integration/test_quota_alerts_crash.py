"""Budget alerts survive kill -9 (docs/contract.md, "quota.threshold_crossed": at least once,
consumers dedupe by `event_id`; rebuilds send nothing and store the same alerts).

A real worker serves a policy whose daily `total` limit is 1,000,000 micro-credits (monthly limits
too large to alert, overshoot tolerance 1000, so a turn's usage may charge far more than its
reserve). Several users play rounds of turns with seeded charges, one turn per user and round; in
the second round half the completions go out, and once one of them settled the other half go out
and the worker is SIGKILLed right after the broker acknowledged them (settlements are flowing: the
test checks that the round was part settled when the worker died), then restarted at once. Then:

* every alert the settled spend implies (computed here from the settled turns' charges and the
  limit, `spent × 100 ≥ pct × limit`) is on `quota-alerts` at least once, and nothing else: the
  distinct `event_id`s there are exactly the stored rows, each id the contract's uuid5;
* `minichat replay` over the live database adds no outbox row and no record to `quota-alerts`;
* records of `quota-alerts` that are not valid alerts of their key's tenant are ignored (counted);
* a rebuild into an empty database gives the same `quota_alerts` rows and the same digest: which
  settlement crossed a threshold (`spent_credits_micro`, `request_id`, `occurred_at`) depends on
  the order in which a user's settlements on different partitions were applied, which the rebuild
  does not know; it stores the alerts recorded on `quota-alerts` as recorded before it applies
  the log, so it derives none of them again.

The day-by-day half of the issue's test (six alerts over two days, exact order) is
test_quota_alerts_days.py: a live broker chooses the record timestamps.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from minichat.bench.scratch import delete_topics
from minichat.domain.ids import ID_NAMESPACE
from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.settings import Settings
from minichat.tools.rebuild import run_rebuild
from tests.conftest import Deployment, deployment_settings
from tests.gateway import Gateway, policy_file
from tests.support import (
    Endpoints,
    TopicReader,
    WorkerProcess,
    db_digest,
    end_offsets,
    produce,
    run_cli,
    run_worker,
    scratch_database,
    wait_until,
)

pytestmark = pytest.mark.integration

LIMIT = 1_000_000
THRESHOLDS = (50, 80, 100)
USERS = 8
ROUNDS = 4
KILL_ROUND = 1
CHARGES = (20_001, 90_001, 150_001, 250_001, 350_001, 600_001)
"""Odd charges (`ceil(4 / 4) + 2 * out` on gpt-5-mini): a turn moves 2 %-60 % of the limit."""
QUIET_CHARGE = 10_001
"""User 0 spends this per turn: 4 %, never reaching 50 %, so it must get no alert at all."""
SESSION_TIMEOUT_S = "6"
"""The broker's minimum: a killed member leaves the group when its session expires."""


def plan(rng: random.Random) -> list[list[int]]:
    """Charge of each user's turn, per round."""
    return [[QUIET_CHARGE if u == 0 else rng.choice(CHARGES) for u in range(USERS)] for _ in range(ROUNDS)]


async def settled_count(db: asyncpg.Pool, tenant: uuid.UUID, ids: list[uuid.UUID]) -> int:
    n = await db.fetchval(
        "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND request_id = ANY($2)"
        " AND settled_at IS NOT NULL",
        tenant,
        ids,
    )
    return int(n)


async def settled(db: asyncpg.Pool, tenant: uuid.UUID, ids: list[uuid.UUID], at_least: int) -> bool:
    return await settled_count(db, tenant, ids) >= at_least


async def alert_rows(url: str) -> list[dict[str, Any]]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            "SELECT * FROM quota_alerts ORDER BY tenant_id, user_id, bucket, period_type, period_start,"
            " threshold_percent"
        )
    finally:
        await con.close()
    return [dict(r) for r in rows]


def contract_id(e: dict[str, Any]) -> str:
    name = (
        f"alert:{e['tenant_id']}:{e['user_id']}:{e['bucket']}:{e['period_type']}:{e['period_start']}"
        f":{e['threshold_percent']}"
    )
    return str(uuid.uuid5(ID_NAMESPACE, name))


async def test_a_kill_mid_run_loses_no_alert_and_a_replay_or_rebuild_adds_none(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    policy = policy_file(
        tmp_path,
        limits={
            "standard": {"daily": LIMIT, "monthly": 10**12},
            "premium": {"daily": LIMIT, "monthly": 10**12},
        },
        overshoot_tolerance=1000.0,
        usage_grace_s=2,
        watchdog_interval_s=1,
    )
    async with scratch_database(endpoints.database_url, "k", template=template_database) as url:
        settings = deployment_settings(endpoints, url, policy_file=policy)
        await create_topics(settings)
        try:
            await _play_kill_and_rebuild(endpoints, template_database, tmp_path, settings)
        finally:
            await delete_topics(settings)


async def _play_kill_and_rebuild(
    endpoints: Endpoints, template_database: str, tmp_path: Path, settings: Settings
) -> None:
    names = TopicNames(settings.topic_prefix)
    env = {**Deployment(settings).env(), "MINICHAT_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S}
    tenant = uuid.uuid4()
    users = [uuid.uuid4() for _ in range(USERS)]
    charges = plan(random.Random(20261207))
    logs = iter(tmp_path / f"worker-{i}.log" for i in range(100))

    with ExitStack() as stack:
        worker: WorkerProcess = stack.enter_context(run_worker(env, next(logs)))
        db = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            async with (
                TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as decisions,
                TopicReader(settings.kafka_bootstrap_servers, names.quota_alerts) as alerts,
            ):
                gw = Gateway(settings, decisions)
                at_kill = killed_round = -1
                for r in range(ROUNDS):
                    commands = [gw.requested(tenant, users[u], uuid.uuid4()) for u in range(USERS)]
                    await gw.send(*commands)
                    answered = await gw.answers(commands, timeout=90)
                    first = {d["command_event_id"]: d for d in reversed(answered)}
                    allowed = [c for c in commands if first[c["event_id"]]["decision"] != "reject"]
                    completions = [
                        gw.provider(
                            "turn.completed",
                            c,
                            content="a",
                            usage={
                                "input_tokens": 4,
                                "output_tokens": (charges[r][users.index(uuid.UUID(c["user_id"]))] - 1) // 2,
                            },
                        )
                        for c in allowed
                    ]
                    ids = [uuid.UUID(c["request_id"]) for c in allowed]
                    if r == KILL_ROUND:
                        # Half the round's completions; once one settled, the other half, and
                        # the kill right after its acknowledgement: settlements are flowing.
                        assert len(ids) >= 4, "the kill round needs turns to settle"
                        half = len(completions) // 2
                        await gw.send_provider(*completions[:half])
                        await wait_until(
                            partial(settled, db, tenant, ids, 1),
                            timeout=60,
                            what="a settlement to kill under",
                        )
                        await gw.send_provider(*completions[half:])
                        worker.kill()
                        at_kill = await settled_count(db, tenant, ids)
                        worker = stack.enter_context(run_worker(env, next(logs)))
                    else:
                        await gw.send_provider(*completions)
                    await wait_until(
                        partial(settled, db, tenant, ids, len(ids)), timeout=120, what=f"round {r} settled"
                    )
                    if r == KILL_ROUND:
                        killed_round = len(ids)
                print(f"kill: {at_kill} of the round's {killed_round} turns settled when the worker died")
                assert 0 < at_kill < killed_round, "the kill must land while settlements are still flowing"

                # Expected alerts, from the settled spend and the limit alone.
                spend: dict[tuple[uuid.UUID, Any], int] = defaultdict(int)
                for row in await db.fetch(
                    "SELECT requester_user_id, period_daily, committed_credits_micro FROM chat_turns"
                    " WHERE tenant_id = $1 AND settled_at IS NOT NULL",
                    tenant,
                ):
                    spend[(row["requester_user_id"], row["period_daily"])] += row["committed_credits_micro"]
                expected = {
                    (str(user), str(day), pct)
                    for (user, day), spent in spend.items()
                    for pct in THRESHOLDS
                    if spent * 100 >= pct * LIMIT
                }
                assert expected, "the plan must cross thresholds"
                assert not any(u == str(users[0]) for u, _, _ in expected), "user 0 stays under 50 %"
                assert len({u for u, _, _ in expected}) >= 3, expected

                async def published() -> bool:
                    return bool(
                        await db.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL")
                    )

                await wait_until(published, timeout=60, what="the relay to publish every outbox row")
                stored = await db.fetch("SELECT * FROM quota_alerts WHERE tenant_id = $1", tenant)

                def seen(values: list[dict[str, Any]]) -> bool:
                    got = {(v["user_id"], v["period_start"], v["threshold_percent"]) for v in values}
                    return got >= expected

                values = await alerts.wait_for(seen, timeout=60, what="every expected alert")
                await alerts.poll()
                values = alerts.values()
                assert {
                    (v["user_id"], v["bucket"], v["period_type"], v["period_start"], v["threshold_percent"])
                    for v in values
                } == {(u, "total", "daily", d, p) for u, d, p in expected}
                assert {v["event_id"] for v in values} == {str(r["event_id"]) for r in stored}
                assert len(stored) == len(expected)
                for v in values:
                    assert v["event_id"] == contract_id(v)
                    assert v["spent_credits_micro"] * 100 >= v["threshold_percent"] * LIMIT
                copies = len(values) - len({v["event_id"] for v in values})
                print(f"alerts: {len(stored)} stored, {len(values)} records, {copies} re-sent copies")

                # `minichat replay` over the live database (the worker caught up): nothing new.
                outputs = [names.quota_alerts, names.billing_usage]
                offsets = await end_offsets(settings, outputs)
                outbox = await db.fetchval("SELECT count(*) FROM outbox")
                live_digest = await db_digest(settings.database_url)
                live_rows = await alert_rows(settings.database_url)
                done = run_cli(env, "replay", "--no-progress", "--json", timeout=300)
                assert done.returncode == 0, done.stderr
                assert json.loads(done.stdout)["applied"] == 0, done.stdout
                assert await db.fetchval("SELECT count(*) FROM outbox") == outbox
                assert await db_digest(settings.database_url) == live_digest
                assert worker.terminate() == 0, worker.log()[-3000:]
                assert await end_offsets(settings, outputs) == offsets
        finally:
            await db.close()

    # Records that are not alerts (not an event; a copy keyed by another tenant, naming another
    # turn) are counted and ignored by the rebuild.
    forged = {**values[0], "request_id": str(uuid.uuid4())}
    await produce(
        settings.kafka_bootstrap_servers,
        names.quota_alerts,
        [(str(tenant).encode(), b"not an alert"), (str(uuid.uuid4()).encode(), json.dumps(forged).encode())],
    )

    # A rebuild into an empty database: the same alert rows, the same books.
    async with scratch_database(endpoints.database_url, "kr", template=template_database) as empty:
        summary = await run_rebuild(
            settings.model_copy(update={"database_url": empty}), show_progress=False, check_workers=False
        )
        rebuilt = await db_digest(empty)
        rebuilt_rows = await alert_rows(empty)
    assert (summary.alerts_recorded, summary.alerts_ignored) == (len(live_rows), 2), summary.as_dict()
    # Which thresholds crossed, with which ids and limits: fixed by the settled spend alone; which
    # settlement crossed each: the recorded alerts, stored as recorded.
    assert [_window(r) for r in rebuilt_rows] == [_window(r) for r in live_rows]
    others = set(live_digest.tables) - {"quota_alerts", "outbox"}
    assert {t: rebuilt.tables[t] for t in others} == {t: live_digest.tables[t] for t in others}
    differing = [
        f"user {a['user_id']} {a['threshold_percent']} %: live {_crossing(a)}, rebuilt {_crossing(b)}"
        for a, b in zip(live_rows, rebuilt_rows, strict=True)
        if a != b
    ]
    assert not differing, "a rebuild attributes crossings differently from the live worker:\n" + "\n".join(
        differing
    )
    assert rebuilt_rows == live_rows
    assert rebuilt == live_digest


def _crossing(row: dict[str, Any]) -> str:
    return f"{row['spent_credits_micro']} by {row['request_id']} at {row['occurred_at']}"


def _window(row: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("tenant_id", "user_id", "bucket", "period_type", "period_start", "threshold_percent", "event_id")
    return (*(row[k] for k in keys), row["limit_credits_micro"])
