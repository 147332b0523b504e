"""Two owners of one partition set at once cannot decide a command twice (issue 10, item 4).

`DecisionConflict` (a decision key taken between loading and writing) used to be fatal, and delete
commands took no lock, so two workers overlapping in a rebalance could reach it. Under the ordered
engine every command of a batch (deletes included) is locked before anything is loaded, and the
positions claim makes a second owner wait and then re-read: here the claim is left out, and two
connections apply the very same merged batch at once, as two owners would, the second starting
while the first has not committed. Each command is decided
once; the second owner answers it as a replay. (Were the conflict reached anyway, it is retried.)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.batches import MergedBatches
from minichat.processors.errors import Action, classify
from minichat.processors.pipeline import Decoded
from minichat.processors.records import Output, SourceRecord
from minichat.storage.db import connect
from minichat.storage.policies import ensure_policy_version
from minichat.storage.turn_requests import DecisionConflict
from minichat.storage.watchdog import StaleTurn, mark_orphan_sent
from tests.conftest import deployment_settings
from tests.gateway import Event, Gateway
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration


def as_records(names: TopicNames, events: list[Event], first_offset: int) -> list[SourceRecord]:
    now = datetime.now(UTC)
    return [
        SourceRecord(
            names.turn_requests,
            0,
            first_offset + i,
            str(e["chat_id"]).encode(),
            json.dumps(e).encode(),
            now,
        )
        for i, e in enumerate(events)
    ]


async def apply(con: asyncpg.Connection, batches: MergedBatches, records: list[SourceRecord]) -> list[Output]:
    good = [d for d in batches.decode(records) if isinstance(d, Decoded)]
    async with con.transaction():
        return await batches.apply(con, good)


def decisions(outputs: list[Output], names: TopicNames) -> list[dict[str, Any]]:
    return [json.loads(o.value) for o in outputs if o.topic == names.turn_decisions]


async def test_two_owners_applying_one_batch_at_once_decide_each_command_once(
    endpoints: Endpoints, database_url: str
) -> None:
    settings = deployment_settings(endpoints, database_url)
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    batches = build_batches(settings, policy)
    gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
    tenant = uuid.uuid4()
    owners = [(uuid.uuid4(), uuid.uuid4()) for _ in range(8)]  # (user, chat): a user each
    first = [gw.requested(tenant, user, chat) for user, chat in owners]

    one, two, observer = await connect(settings), await connect(settings), await connect(settings)
    try:
        await ensure_policy_version(one, policy)
        answered = decisions(await apply(one, batches, as_records(names, first, 0)), names)
        assert {d["decision"] for d in answered} == {"allow"}
        # The batch two owners race on: chat deletes (which took no lock before and lock no turn
        # row), each of its own user, so that no row lock serialises the two transactions early.
        racing = [gw.delete_chat(tenant, u, c) for u, c in owners]
        records = as_records(names, racing, len(first))
        # The first owner holds its transaction open until the second is inside its own and
        # waiting on a lock (or done): the two overlap for certain, in the worst order.
        async with one.transaction():
            first_outputs = await batches.apply(
                one, [d for d in batches.decode(records) if isinstance(d, Decoded)]
            )
            second = asyncio.create_task(apply(two, batches, records))

            async def second_waits_or_ended() -> bool:
                waiting = await observer.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    two.get_server_pid(),
                )
                return second.done() or bool(waiting)

            await wait_until(
                second_waits_or_ended, timeout=30, what="the second owner inside its transaction"
            )
        answers = [decisions(first_outputs, names), decisions(await second, names)]
        for command in racing:
            copies = [d for a in answers for d in a if d["command_event_id"] == command["event_id"]]
            assert len(copies) == 2, command["type"]
            assert [d["replay"] for d in copies] == [False, True], f"{command['type']} decided twice"
            assert len({d["decision"] for d in copies}) == 1
        stored = await one.fetchval(
            "SELECT count(*) FROM turn_decisions WHERE tenant_id = $1 AND command_event_id = ANY($2::uuid[])",
            tenant,
            [uuid.UUID(str(c["event_id"])) for c in racing],
        )
        assert stored == len(racing)
    finally:
        for con in (one, two, observer):
            await con.close()


def test_a_decision_conflict_is_retried_not_fatal() -> None:
    assert classify(DecisionConflict("2 decisions, 1 stored")) is Action.RETRY


async def test_a_watchdog_mark_never_closes_a_lock_cycle_with_the_engine(
    endpoints: Endpoints, database_url: str
) -> None:
    """Issue 10, item 5: an engine batch locks turn rows across its steps in no fixed order. A
    watchdog mark that held one turn while it waited for another closed a cycle with such a batch
    (PostgreSQL then aborts one of the two). Marks now take one turn per statement: the mark waits
    for the turn the engine holds while holding nothing, and both finish."""
    settings = deployment_settings(endpoints, database_url)
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    batches = build_batches(settings, policy)
    gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
    tenant = uuid.uuid4()
    requests = [gw.requested(tenant, uuid.uuid4(), uuid.uuid4()) for _ in range(2)]
    engine, watchdog, observer = await connect(settings), await connect(settings), await connect(settings)
    try:
        await ensure_policy_version(engine, policy)
        await apply(engine, batches, as_records(names, requests, 0))
        rows = await engine.fetch(
            "SELECT id, tenant_id, chat_id, request_id, progress_seq, now() AS seen_now FROM chat_turns"
            " WHERE tenant_id = $1 ORDER BY id",
            tenant,
        )
        low, high = (StaleTurn(**dict(r)) for r in rows)
        async with engine.transaction():
            # the engine's batch holds the higher turn (an earlier step) ...
            await engine.execute(
                "SELECT 1 FROM chat_turns WHERE tenant_id = $1 AND id = $2 FOR UPDATE", tenant, high.id
            )
            # ... the watchdog marks both, in id order: it waits for the higher one ...
            mark = asyncio.create_task(mark_orphan_sent(watchdog, [low, high]))

            async def mark_waits() -> bool:
                waiting = await observer.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    watchdog.get_server_pid(),
                )
                return mark.done() or bool(waiting)

            await wait_until(mark_waits, timeout=30, what="the watchdog's mark to wait")
            # ... and the engine's next step locks the lower one: free, no cycle
            await asyncio.wait_for(
                engine.execute(
                    "SELECT 1 FROM chat_turns WHERE tenant_id = $1 AND id = $2 FOR UPDATE", tenant, low.id
                ),
                10,
            )
        await asyncio.wait_for(mark, 10)
        marked = await engine.fetch(
            "SELECT id, orphan_sent_at IS NOT NULL AS marked FROM chat_turns WHERE tenant_id = $1", tenant
        )
        assert {r["id"]: r["marked"] for r in marked} == {low.id: True, high.id: True}
    finally:
        for con in (engine, watchdog, observer):
            await con.close()
