"""`minichat policy check`, `minichat policy diff` and `minichat rebuild` (alias `replay`) through
the real broker and database (docs/contract.md, "Commands"; docs/operations.md, "Upgrades,
migrations and policy changes").

One live worker decides sequential turns of three users in two tenants under version 1 (both
tenants' daily limit 300,000 micro-credits). Each turn is its own chat (so every reserve is the
same), settles with inline usage before the next is sent, and the later ones are refused
(`quota_exceeded`). A candidate (version 2) halves tenant A's daily limit. The test computes,
from the recorded decisions and charges alone, which commands from `--from-time` on the candidate
refuses, and checks that the dry run reports exactly those, leaves tenant B unchanged, produces
nothing (the end offsets of every topic of the deployment) and writes nothing live (its digest).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2

from minichat.tools.kafka import topic_partitions
from minichat.tools.rebuild import parse_time
from tests.conftest import Deployment, Live, live_deployment
from tests.gateway import Event, policy_file
from tests.support import Endpoints, db_digest, run_cli, scratch_database, wait_until

pytestmark = pytest.mark.integration

DAILY = 300_000
"""Both tenants' daily limit under version 1 (micro-credits): nine turns fit, not ten."""
TURNS = 12
BEFORE = 3
"""Turns of each user sent before `--from-time` (applied as recorded by the dry run)."""
USAGE = {"input_tokens": 1000, "output_tokens": 15000}
TENANT_A, TENANT_B = uuid.uuid4(), uuid.uuid4()
PARTITIONS = 4
"""The tests' deployments' partitions (tests/conftest.py)."""


def chat_on(partition: int) -> uuid.UUID:
    """A new chat whose records go to `partition`: each user's chats share one partition set, the
    unit the log orders (a user's chats on several sets are not ordered against each other, and a
    dry run could interleave them otherwise than the workers did)."""
    while True:
        chat = uuid.uuid4()
        if (murmur2(str(chat).encode()) & 0x7FFFFFFF) % PARTITIONS == partition:
            return chat


def _policy(directory: Path, version: int, daily_a: int) -> Path:
    tenants = {
        str(TENANT_A): {"limits": {"standard": {"daily": daily_a}}},
        str(TENANT_B): {"limits": {"standard": {"daily": DAILY}}},
    }
    return policy_file(directory, version=version, tenants=tenants)


@dataclass
class Sent:
    """Each user's commands in order, with the recorded decision and (accepted) charge."""

    commands: dict[uuid.UUID, list[tuple[Event, dict[str, Any], int]]] = field(default_factory=dict)
    users: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # user -> tenant
    middle: datetime | None = None


@pytest.fixture(scope="module")
async def live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    workdir = tmp_path_factory.mktemp("policydiff")
    async with live_deployment(
        endpoints, template_database, workdir, policy=_policy(workdir, 1, DAILY)
    ) as deployment:
        yield deployment


async def _charge(live: Live, command: Event) -> int:
    async def settled() -> Any:
        return await live.db.fetchval(
            "SELECT committed_credits_micro FROM chat_turns WHERE tenant_id = $1 AND request_id = $2 "
            "AND settled_at IS NOT NULL",
            uuid.UUID(command["tenant_id"]),
            uuid.UUID(command["request_id"]),
        )

    found = await wait_until(settled, timeout=60, what="the turn to settle")
    return int(found)


@pytest.fixture(scope="module")
async def traffic(live: Live) -> Sent:
    g, sent = live.gateway, Sent()
    users = {uuid.uuid4(): TENANT_A, uuid.uuid4(): TENANT_A, uuid.uuid4(): TENANT_B}
    sent.users = users

    async def turns(user: uuid.UUID, count: int) -> None:
        for _ in range(count):
            command = g.requested(users[user], user, chat_on(user.int % PARTITIONS), content="hello")
            [decision] = await g.decide(command)
            charge = 0
            if decision["decision"] != "reject":
                await g.send_provider(g.provider("turn.completed", command, content="answer", usage=USAGE))
                charge = await _charge(live, command)
            sent.commands.setdefault(user, []).append((command, decision, charge))

    await asyncio.gather(*(turns(u, BEFORE) for u in users))
    await asyncio.sleep(0.05)  # the scenario: every record so far strictly older than `middle`
    sent.middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await asyncio.gather(*(turns(u, TURNS - BEFORE) for u in users))

    async def published() -> bool:
        return not await live.db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")

    await wait_until(published, timeout=60, what="the outbox to be published")
    return sent


def expected_under(sent: Sent, limits: dict[uuid.UUID, int]) -> dict[str, Any]:
    """What the candidate does to the commands from `middle` on, computed from the recorded
    decisions and charges only: a command is admitted while spent + reserve <= the daily limit."""
    assert sent.middle is not None
    result: dict[str, Any] = {}
    for user, commands in sent.commands.items():
        tenant = str(sent.users[user])
        reserves = {d["reserved_credits_micro"] for _, d, _ in commands if d["decision"] != "reject"}
        assert len(reserves) == 1, reserves  # one reserve for every turn (each its own chat)
        [reserve] = reserves
        mine = result.setdefault(
            tenant,
            {"commands": 0, "changes": {}, "recorded": 0, "candidate": 0, "refused": [0, 0], "users": {}},
        )
        spent = 0
        for _, decision, charge in commands:
            recorded = decision["decision"] + (f"/{decision['error_code']}" if decision["error_code"] else "")
            if parse_time(decision["decided_at"]) < sent.middle:
                spent += charge
                continue
            if spent + reserve <= limits[sent.users[user]]:
                assert decision["decision"] == "allow", decision  # allowed under the higher limit too
                candidate, spent = "allow", spent + charge
                mine["candidate"] += charge
            else:
                candidate = "reject/quota_exceeded"
                mine["refused"][1] += 1
            mine["commands"] += 1
            mine["recorded"] += charge
            mine["refused"][0] += decision["error_code"] == "quota_exceeded"
            if recorded != candidate:
                mine["changes"][(recorded, candidate)] = mine["changes"].get((recorded, candidate), 0) + 1
                mine["users"][str(user)] = mine["users"].get(str(user), 0) + 1
    return result


async def _end_offsets(live: Live) -> dict[Any, int]:
    """Every partition of every topic of the deployment, with its end offset."""
    admin = AIOKafkaAdminClient(bootstrap_servers=live.settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(live.settings.topic_prefix)]
    finally:
        await admin.close()
    partitions = [tp for tps in (await topic_partitions(live.settings, topics)).values() for tp in tps]
    consumer = AIOKafkaConsumer(bootstrap_servers=live.settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def _diff_databases(url: str) -> set[str]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'minichat_diff_%'")
    finally:
        await con.close()
    return {r["datname"] for r in rows}


async def test_policy_diff_reports_exactly_the_computed_rejections_and_changes_nothing(
    live: Live, traffic: Sent, tmp_path: Path
) -> None:
    assert traffic.middle is not None
    candidate = _policy(tmp_path, 2, DAILY // 2)
    expected = expected_under(traffic, {TENANT_A: DAILY // 2, TENANT_B: DAILY})
    assert sum(expected[str(TENANT_A)]["changes"].values()) > 0  # the scenario bites
    env = Deployment(live.settings).env()
    offsets, digest = await _end_offsets(live), await db_digest(live.settings.database_url)
    scratch_before = await _diff_databases(live.settings.database_url)

    result = run_cli(
        env,
        "policy",
        "diff",
        "--candidate",
        str(candidate),
        "--from-time",
        traffic.middle.isoformat(),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["candidate_version"] == 2
    by_tenant = {t["tenant_id"]: t for t in report["tenants"]}
    assert set(by_tenant) == {str(TENANT_A), str(TENANT_B)}
    for tenant, wanted in expected.items():
        got = by_tenant[tenant]
        assert got["commands"] == wanted["commands"], got
        assert {(c["recorded"], c["candidate"]): c["count"] for c in got["changes"]} == wanted["changes"]
        assert got["changed"] == sum(wanted["changes"].values())
        assert got["charged_credits_micro"] == {
            "recorded": wanted["recorded"],
            "candidate": wanted["candidate"],
        }
        assert got["reserves_refused"] == {
            "recorded": wanted["refused"][0],
            "candidate": wanted["refused"][1],
        }
        assert {u["user_id"]: u["changed_commands"] for u in got["most_affected_users"]} == wanted["users"]
        assert all(
            set(u) == {"user_id", "changed_commands", "charged_credits_micro"}
            for u in got["most_affected_users"]
        )
    other = by_tenant[str(TENANT_B)]
    assert other["changes"] == [] and other["most_affected_users"] == []
    assert other["charged_credits_micro"]["recorded"] == other["charged_credits_micro"]["candidate"] > 0

    # nothing produced, nothing written live, no scratch database left behind
    assert await _end_offsets(live) == offsets
    assert await db_digest(live.settings.database_url) == digest
    assert await _diff_databases(live.settings.database_url) == scratch_before

    # --tenant filters the report; the lines name the change and never a message's content
    lines = run_cli(
        env, "policy", "diff", "--candidate", str(candidate), "--from-time", traffic.middle.isoformat(),
        "--tenant", str(TENANT_B),
    )  # fmt: skip
    assert lines.returncode == 0, lines.stderr
    assert str(TENANT_B) in lines.stdout and str(TENANT_A) not in lines.stdout
    assert "0 would change" in lines.stdout and "hello" not in lines.stdout + lines.stderr
    assert await _end_offsets(live) == offsets


async def test_policy_diff_refuses_a_candidate_reusing_a_recorded_version(
    live: Live, traffic: Sent, tmp_path: Path
) -> None:
    reused = _policy(tmp_path, 1, DAILY // 2)
    result = run_cli(Deployment(live.settings).env(), "policy", "diff", "--candidate", str(reused))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("minichat policy diff: ") and "version" in lines[0], lines[0]


async def test_policy_check_prints_the_changes_against_the_version_in_force(
    live: Live, traffic: Sent, tmp_path: Path
) -> None:
    env = Deployment(live.settings).env()
    candidate = _policy(tmp_path, 2, DAILY // 2)
    result = run_cli(env, "policy", "check", str(candidate))
    assert result.returncode == 0, result.stderr
    assert "version in force: 1" in result.stdout
    assert f"tenants.{TENANT_A}.limits.standard.daily: {DAILY} -> {DAILY // 2}" in result.stdout
    assert "1 change(s)" in result.stdout, result.stdout
    as_json = json.loads(run_cli(env, "policy", "check", "--json", str(candidate)).stdout)
    assert as_json["in_force_version"] == 1 and as_json["version"] == 2
    assert as_json["changes"] == [
        {
            "path": f"tenants.{TENANT_A}.limits.standard.daily",
            "change": "changed",
            "from": DAILY,
            "to": DAILY // 2,
        }
    ]

    bad = yaml.safe_load(candidate.read_text())
    bad["limits"]["standard"]["daily"] = -5
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    refused = run_cli(env, "policy", "check", str(bad_file))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith("minichat policy check: ") and "limits.standard.daily" in lines[0], lines[0]

    reused = _policy(tmp_path, 1, DAILY // 2)
    conflict = run_cli(env, "policy", "check", str(reused))
    assert conflict.returncode == 2 and "version" in conflict.stderr, conflict.stderr

    away = {**env, "MINICHAT_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    unknown = run_cli(away, "policy", "check", str(candidate))
    assert unknown.returncode == 0, unknown.stderr
    assert "version in force: unknown" in unknown.stdout and "cannot reach PostgreSQL" in unknown.stdout


@pytest.mark.parametrize("command", ["rebuild", "replay"])
async def test_rebuild_and_its_alias_replay_rebuild_the_live_books(
    command: str, live: Live, traffic: Sent, endpoints: Endpoints, template_database: str
) -> None:
    live_digest = await db_digest(live.settings.database_url)
    async with scratch_database(endpoints.database_url, "rb", template=template_database) as url:
        env = {**Deployment(live.settings).env(), "MINICHAT_DATABASE_URL": url}
        result = run_cli(env, command, "--no-progress", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["read"] > 0
        assert await db_digest(url) == live_digest
