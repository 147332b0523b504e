"""`minichat replay` through the real broker and database (docs/contract.md, "Commands" and "Guarantees").

One live worker serves the module; `traffic` runs once: two tenants, requests, completions with
inline usage, a usage that comes after its completion, a retry, a rejection, a duplicate
command, a late second terminal event, a chat deleted and asked again, an event of a request
that is never decided (it stays parked) and two dead letters. Every path settles without the
watchdog but two: the module's worker has short watchdog timers, and one turn is orphaned, one
settled as estimated when its usage grace expires and re-priced when the usage comes (the
watchdog's events are in the input topics, so a replay sees them). The worker's relay publishes
the outbox; a replay must add nothing to it, nor to billing-usage, turn-decisions or dead-letters.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from minichat.models.topics import TopicNames
from minichat.storage.digest import Digest
from minichat.tools.rebuild import RebuildSummary, parse_time, run_rebuild
from tests.conftest import Deployment, Live, live_deployment
from tests.gateway import Event, policy_file
from tests.support import (
    ROOT,
    Endpoints,
    db_digest,
    end_offsets,
    produce,
    scratch_database,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    """What was sent, and what the live database looked like once it had all been applied."""

    records: dict[str, int] = field(default_factory=dict)  # topic -> records sent
    commands: int = 0  # valid commands (each gets a decision, duplicates included)
    stored_decisions: int = 0  # distinct decided commands
    middle: datetime | None = None  # event time of a command in the middle of the traffic
    before_middle: int = 0  # records sent before `middle`
    digest: Digest | None = None
    outbox: int = 0

    @property
    def total(self) -> int:
        return sum(self.records.values())


async def settled(live: Live, command: Event) -> Any:
    async def check() -> Any:
        return await live.db.fetchval(
            "SELECT settled_at FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2 AND request_id = $3",
            uuid.UUID(command["tenant_id"]),
            uuid.UUID(command["chat_id"]),
            uuid.UUID(command.get("new_request_id", command["request_id"])),
        )

    return await wait_until(check, timeout=60, what="the turn to settle")


async def counts(db: asyncpg.Pool) -> dict[str, int]:
    return {
        table: await db.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("outbox", "turn_decisions", "chat_turns", "parked_events")
    }


@pytest.fixture(scope="module")
async def live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """The module's worker, with watchdog timers short enough to orphan a turn and expire a grace."""
    workdir = tmp_path_factory.mktemp("replay")
    policy = policy_file(workdir, orphan_timeout_s=3, usage_grace_s=2, watchdog_interval_s=1)
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as deployment:
        yield deployment


@pytest.fixture(scope="module")
async def traffic(live: Live) -> Traffic:
    g, names, sent = live.gateway, TopicNames(live.settings.topic_prefix), Traffic()
    sent.records = {names.turn_requests: 0, names.provider_responses: 0, names.usage: 0}

    async def decide(*commands: Event) -> list[dict[str, Any]]:
        sent.records[names.turn_requests] += len(commands)
        sent.commands += len(commands)
        return await g.decide(*commands)

    async def provider(*events: Event) -> None:
        sent.records[names.provider_responses] += len(events)
        await g.send_provider(*events)

    async def usage(*events: Event) -> None:
        sent.records[names.usage] += len(events)
        await g.send_usage(*events)

    tenant, other_tenant = uuid.uuid4(), uuid.uuid4()
    alice, bob, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    c1, c2, c3, c4 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    # 1. a request completed with inline usage (progress first), in two tenants at once
    a = g.requested(tenant, alice, c1, content="first question")
    d = g.requested(other_tenant, carol, c4, content="other tenant")
    answers = await decide(a, d)
    assert [x["decision"] for x in answers] == ["allow", "allow"], answers
    await provider(
        g.provider("turn.progress", a),
        g.provider("turn.progress", d),
        g.provider("turn.completed", a, content="answer", usage={"input_tokens": 120, "output_tokens": 340}),
        g.provider("turn.completed", d, content="other", usage={"input_tokens": 7, "output_tokens": 9}),
    )
    await settled(live, a)
    await settled(live, d)

    # 2. a duplicate of that command (re-sent with replay: true) and a late second terminal event
    [dup] = await g.answers([a], copies=1)
    await g.send(a)
    sent.records[names.turn_requests] += 1
    sent.commands += 1
    await g.answers([a], copies=2)
    assert dup["decision"] == "allow"
    await provider(g.provider("turn.cancelled", a, content=""))

    # 3. a rejection (too many images) and a retry of the settled turn that fails, released
    await asyncio.sleep(0.05)  # every record so far is strictly older than `middle`
    sent.before_middle = sum(sent.records.values())
    rejected = g.requested(tenant, bob, c2, content="pictures", image_count=99)
    retry = g.retry(tenant, alice, c1, a["request_id"])
    [no, again] = await decide(rejected, retry)
    assert (no["decision"], no["error_code"]) == ("reject", "too_many_images"), no
    assert again["decision"] in ("allow", "downgrade"), again
    sent.middle = parse_time(again["decided_at"])
    await provider(g.provider("turn.failed", retry, error_code="context_length_exceeded"))
    await settled(live, retry)

    # 4. usage after the completion
    b = g.requested(tenant, bob, c2, content="second question")
    [ok] = await decide(b)
    assert ok["decision"] in ("allow", "downgrade"), ok
    await provider(g.provider("turn.completed", b, content="later usage"))
    await asyncio.sleep(0.3)  # the scenario: usage stamped clearly after the completion, not a wait
    await usage(g.usage(b, 30, 40))
    await settled(live, b)

    # 5. a chat completed, deleted, then asked again (rejected: chat_not_found)
    c = g.requested(tenant, alice, c3, content="third")
    await decide(c)
    await provider(
        g.provider("turn.completed", c, content="done", usage={"input_tokens": 1, "output_tokens": 2})
    )
    await settled(live, c)
    [done] = await decide(g.delete_chat(tenant, alice, c3))
    assert done["decision"] == "done", done
    [gone] = await decide(g.requested(tenant, alice, c3, content="still there?"))
    assert (gone["decision"], gone["error_code"]) == ("reject", "chat_not_found"), gone

    # 6. the watchdog's events: a turn orphaned (no provider event at all), and a completion
    #    without usage settled as estimated when the grace expires, re-priced when usage comes
    orphan = g.requested(tenant, carol, uuid.uuid4(), content="silence")
    grace = g.requested(tenant, carol, uuid.uuid4(), content="usage is late")
    assert [x["decision"] for x in await decide(orphan, grace)] == ["allow", "allow"]
    await provider(g.provider("turn.completed", grace, content="no usage yet"))
    await settled(live, orphan)
    await settled(live, grace)
    await usage(g.usage(grace, 50, 60))

    async def adjusted() -> Any:
        return await live.db.fetchval(
            "SELECT adjusted_at FROM chat_turns WHERE tenant_id = $1 AND request_id = $2",
            tenant,
            uuid.UUID(grace["request_id"]),
        )

    await wait_until(adjusted, timeout=60, what="the late usage to re-price the turn")

    # 7. an event of a request never decided (stays parked) and two dead letters
    stray = g.requested(tenant, alice, uuid.uuid4())
    await provider(g.provider("turn.progress", stray))
    bad_key = str(uuid.uuid4()).encode()
    await produce(live.settings.kafka_bootstrap_servers, names.turn_requests, [(bad_key, b"{not json")])
    await produce(
        live.settings.kafka_bootstrap_servers,
        names.provider_responses,
        [(bad_key, json.dumps({"type": "turn.completed", "chat_id": bad_key.decode()}).encode())],
    )
    sent.records[names.turn_requests] += 1
    sent.records[names.provider_responses] += 1

    async def parked() -> bool:
        return await live.db.fetchval("SELECT count(*) FROM parked_events") == 1

    await wait_until(parked, timeout=60, what="the stray event to be parked")

    async def relayed() -> bool:
        return await live.db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

    # the worker's relay publishes the billing events: wait, so billing-usage is quiet from here on
    await wait_until(relayed, timeout=60, what="the outbox to be relayed")
    # what a replay reads: everything sent, plus what the watchdog wrote (orphaned, grace_expired)
    inputs = [names.turn_requests, names.provider_responses, names.usage]
    log = await end_offsets(live.settings, inputs)
    written = {t: sum(end for tp, end in log.items() if tp.topic == t) for t in inputs}
    assert written[names.provider_responses] >= sent.records[names.provider_responses] + 1
    assert written[names.usage] >= sent.records[names.usage] + 1
    assert written[names.turn_requests] == sent.records[names.turn_requests]
    sent.records = written
    sent.stored_decisions = await live.db.fetchval("SELECT count(*) FROM turn_decisions")
    assert sent.stored_decisions == sent.commands - 1  # the duplicate stored nothing
    sent.digest = await db_digest(live.settings.database_url)
    sent.outbox = await live.db.fetchval("SELECT count(*) FROM outbox")
    assert sent.outbox == 8  # a, d, retry (released), b, c, orphan, grace settled + adjusted
    kinds = await live.db.fetch("SELECT payload->>'settlement_method' AS m FROM outbox ORDER BY dedupe_key")
    assert sorted(k["m"] for k in kinds).count("estimated") == 2, kinds
    return sent


def check_over_live(summary: RebuildSummary, traffic: Traffic) -> None:
    assert summary.read == traffic.total
    assert sum(summary.read_by_topic.values()) == traffic.total
    assert summary.applied == 0
    assert summary.dead_lettered == 2
    assert summary.parked == 1
    assert summary.already_applied == traffic.total - 3
    assert summary.decisions_discarded == traffic.commands
    assert (summary.parked_at_start, summary.parked_at_end) == (1, 1)


# --------------------------------------------------------------------------------------- tests


async def test_replay_over_the_live_database_changes_nothing(live: Live, traffic: Traffic) -> None:
    names = TopicNames(live.settings.topic_prefix)
    outputs = [names.turn_decisions, names.dead_letters, names.billing_usage]
    before_counts, before_offsets = await counts(live.db), await end_offsets(live.settings, outputs)

    summary = await run_rebuild(live.settings, show_progress=False)

    check_over_live(summary, traffic)
    assert await db_digest(live.settings.database_url) == traffic.digest
    assert await counts(live.db) == before_counts  # no outbox row, no decision, nothing parked
    assert await end_offsets(live.settings, outputs) == before_offsets  # nothing re-sent


async def test_replay_command_line(live: Live, traffic: Traffic) -> None:
    env = Deployment(live.settings).env()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "minichat.cli", "replay", "--json",
        env=worker_env(env), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().splitlines()[-1])
    assert result["read"] == traffic.total and result["applied"] == 0
    assert (result["parked"], result["dead_lettered"]) == (1, 2)
    assert f"replay {traffic.total}/{traffic.total} 100%" in err.decode()  # the progress line
    assert "events/s" in err.decode()
    assert "first question" not in err.decode() + out.decode()  # no message content
    assert await db_digest(live.settings.database_url) == traffic.digest
    assert await live.db.fetchval("SELECT count(*) FROM outbox") == traffic.outbox

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "minichat.cli", "replay", "--from-time", "yesterday",
        env=worker_env(env), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2 and "--from-time" in err.decode()


async def test_replay_from_a_time_in_the_middle_reads_less(live: Live, traffic: Traffic) -> None:
    assert traffic.middle is not None
    summary = await run_rebuild(live.settings, from_time=traffic.middle, show_progress=False)
    assert 0 < summary.read < traffic.total
    assert summary.read <= traffic.total - traffic.before_middle
    assert summary.applied == 0
    assert await db_digest(live.settings.database_url) == traffic.digest
    assert await live.db.fetchval("SELECT count(*) FROM outbox") == traffic.outbox

    later = await run_rebuild(
        live.settings, from_time=datetime.now(UTC).replace(year=2100), show_progress=False
    )
    assert later.read == 0


@pytest.fixture
async def blank_database_url(endpoints: Endpoints, template_database: str) -> AsyncIterator[str]:
    async with scratch_database(endpoints.database_url, "r", template=template_database) as url:
        yield url


async def test_replay_into_an_empty_database_rebuilds_the_same_state(
    live: Live, traffic: Traffic, blank_database_url: str
) -> None:
    settings = live.settings.model_copy(update={"database_url": blank_database_url})
    summary = await run_rebuild(settings, show_progress=False)

    rebuilt = await db_digest(blank_database_url)
    assert traffic.digest is not None
    assert rebuilt.tables == traffic.digest.tables
    assert rebuilt == traffic.digest
    con = await asyncpg.connect(blank_database_url)
    try:
        assert await con.fetchval("SELECT count(*) FROM outbox") == traffic.outbox
        assert await con.fetchval("SELECT count(*) FROM policy_versions") == 1  # stored before replaying
        assert await con.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 0
    finally:
        await con.close()
    assert summary.read == traffic.total
    assert summary.applied + summary.already_applied + summary.parked + summary.dead_lettered == summary.read
    assert summary.applied >= traffic.stored_decisions
    assert summary.dead_lettered == 2
    assert (summary.parked_at_start, summary.parked_at_end) == (0, 1)

    # and replaying again into the rebuilt database is a no-op
    again = await run_rebuild(settings, show_progress=False)
    assert again.applied == 0
    assert await db_digest(blank_database_url) == rebuilt


async def test_replay_refuses_an_unmigrated_database(live: Live, empty_database_url: str) -> None:
    env = Deployment(live.settings.model_copy(update={"database_url": empty_database_url})).env()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "minichat.cli", "replay",
        env=worker_env(env), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    assert "run `minichat db migrate`" in err.decode()


def test_from_time_needs_an_offset() -> None:
    assert parse_time("2025-01-31T12:00:00Z") == datetime(2025, 1, 31, 12, tzinfo=UTC)
    assert parse_time("2025-01-31t13:00:00+01:00") == datetime(2025, 1, 31, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="UTC offset"):
        parse_time("2025-01-31T12:00:00")
