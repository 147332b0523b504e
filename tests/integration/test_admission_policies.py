"""Admission rules that depend on the policy: downgrades, kill switches, limits, the worked example.

Each scenario runs its own worker with its own policy file (kill switches are global).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import Live, live_deployment
from tests.gateway import policy_file
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration

SMALL_TENANT = uuid.UUID("3f0c8a52-5f2d-4a57-9d8e-0a6f5c1b7e21")
CROWD_TENANT = uuid.UUID("6b1d0c2e-8f7a-4e55-b0a1-2c3d4e5f6a7b")
# gpt-5-mini, content "hello": input ceil((ceil(5/4) + 100) * 1.10) = 113 tokens at 0.25 credits per
# million, plus 16_384 output tokens at 2 credits per million.
MINI_RESERVE = 29 + 32_768
CROWD_ADMITS = 7


@pytest.fixture(scope="module")
async def switches(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """disable_premium_tier, images and web search off, code interpreter daily quota 0."""
    workdir = tmp_path_factory.mktemp("switches")
    policy = policy_file(
        workdir,
        kill_switches={"disable_premium_tier": True, "disable_images": True, "disable_web_search": True},
        tools={"web_search_daily_quota": 75, "code_interpreter_daily_quota": 0},
    )
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as live:
        yield live


@pytest.fixture(scope="module")
async def forced(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """force_standard_tier (with disable_premium_tier too: force is named first), web search quota 0."""
    workdir = tmp_path_factory.mktemp("forced")
    policy = policy_file(
        workdir,
        kill_switches={"force_standard_tier": True, "disable_premium_tier": True},
        tools={"web_search_daily_quota": 0, "code_interpreter_daily_quota": 50},
    )
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as live:
        yield live


def _catalog_with_nano_disabled() -> list[dict[str, Any]]:
    import yaml

    from minichat.settings import PACKAGED_POLICY

    models: list[dict[str, Any]] = yaml.safe_load(PACKAGED_POLICY.read_text())["models"]
    return [{**m, "enabled": False} if m["id"] == "gpt-5-nano" else m for m in models]


@pytest.fixture(scope="module")
async def limited(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """gpt-5-nano disabled; SMALL_TENANT has no premium budget and less than one gpt-5-mini turn a
    day; CROWD_TENANT has no premium budget and room for exactly `CROWD_ADMITS` gpt-5-mini turns."""
    workdir = tmp_path_factory.mktemp("limited")
    policy = policy_file(
        workdir,
        models=_catalog_with_nano_disabled(),
        tenants={
            str(SMALL_TENANT): {
                "limits": {"standard": {"daily": 30_000}, "premium": {"daily": 0, "monthly": 0}}
            },
            str(CROWD_TENANT): {
                "limits": {
                    "standard": {"daily": CROWD_ADMITS * MINI_RESERVE + 5},
                    "premium": {"daily": 0, "monthly": 0},
                }
            },
        },
    )
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as live:
        yield live


async def test_disable_premium_tier_downgrades(switches: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [d] = await switches.gateway.decide(switches.gateway.requested(tenant, user, chat, model="gpt-5.2"))
    assert (d["decision"], d["effective_model"], d["selected_model"]) == (
        "downgrade",
        "gpt-5-mini",
        "gpt-5.2",
    )
    assert (d["downgrade_from"], d["downgrade_reason"]) == ("gpt-5.2", "disable_premium_tier")
    turn = await switches.db.fetchrow("SELECT * FROM chat_turns WHERE chat_id = $1", chat)
    assert (turn["selected_model"], turn["effective_model"]) == ("gpt-5.2", "gpt-5-mini")
    buckets = await switches.db.fetch("SELECT bucket FROM quota_usage WHERE tenant_id = $1", tenant)
    assert {r["bucket"] for r in buckets} == {"total"}


@pytest.mark.parametrize(
    ("fields", "code", "scope"),
    [
        ({"image_count": 1}, "images_disabled", None),
        ({"web_search": True}, "web_search_disabled", None),
        ({"code_interpreter": True}, "quota_exceeded", "code_interpreter"),
    ],
    ids=["images_disabled", "web_search_disabled", "code_interpreter_quota"],
)
async def test_kill_switch_and_tool_rejections(
    switches: Live, fields: dict[str, Any], code: str, scope: str | None
) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [d] = await switches.gateway.decide(switches.gateway.requested(tenant, user, chat, **fields))
    assert (d["decision"], d["error_code"], d["quota_scope"]) == ("reject", code, scope)
    assert await switches.db.fetchval("SELECT count(*) FROM chat_turns WHERE chat_id = $1", chat) == 0


async def test_force_standard_tier_downgrades(forced: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [d] = await forced.gateway.decide(forced.gateway.requested(tenant, user, chat, model="gpt-5.2"))
    assert (d["decision"], d["effective_model"], d["downgrade_reason"]) == (
        "downgrade",
        "gpt-5-mini",
        "force_standard_tier",
    )


async def test_web_search_daily_quota(forced: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [d] = await forced.gateway.decide(forced.gateway.requested(tenant, user, chat, web_search=True))
    assert (d["decision"], d["error_code"], d["quota_scope"]) == ("reject", "quota_exceeded", "web_search")


async def test_disabled_model_starts_at_premium(limited: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [d] = await limited.gateway.decide(limited.gateway.requested(tenant, user, chat, model="gpt-5-nano"))
    assert (d["decision"], d["effective_model"], d["downgrade_reason"]) == (
        "downgrade",
        "gpt-5.2",
        "model_disabled",
    )


async def test_premium_quota_exhausted_downgrades(limited: Live) -> None:
    user, chat = uuid.uuid4(), uuid.uuid4()
    [d] = await limited.gateway.decide(limited.gateway.requested(CROWD_TENANT, user, chat, model="gpt-5.2"))
    assert (d["decision"], d["effective_model"], d["downgrade_reason"]) == (
        "downgrade",
        "gpt-5-mini",
        "premium_quota_exhausted",
    )


async def test_quota_exceeded_for_tokens(limited: Live) -> None:
    user, chat = uuid.uuid4(), uuid.uuid4()
    [d] = await limited.gateway.decide(limited.gateway.requested(SMALL_TENANT, user, chat, model="gpt-5.2"))
    assert (d["decision"], d["error_code"], d["quota_scope"]) == ("reject", "quota_exceeded", "tokens")
    assert await limited.db.fetchval("SELECT count(*) FROM quota_usage WHERE user_id = $1", user) == 0


async def _stable_members(bootstrap: str, group: str) -> int:
    """Members of a consumer group that finished rebalancing (0 while it is not stable)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    [(_error, _group, state, _protocol_type, _protocol, members)] = response.groups
    return len(members) if state == "Stable" else 0


async def test_two_workers_never_pass_a_users_limit(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    policy = policy_file(
        tmp_path,
        tenants={
            str(CROWD_TENANT): {
                "limits": {
                    "standard": {"daily": CROWD_ADMITS * MINI_RESERVE + 5},
                    "premium": {"daily": 0, "monthly": 0},
                }
            }
        },
    )
    async with live_deployment(endpoints, template_database, tmp_path, policy=policy, workers=2) as live:
        group = live.settings.group_id

        async def both_assigned() -> bool:
            return await _stable_members(endpoints.kafka, group) == 2

        await wait_until(both_assigned, timeout=90, what="two workers sharing the partitions")

        user = uuid.uuid4()
        commands = [live.gateway.requested(CROWD_TENANT, user, uuid.uuid4()) for _ in range(40)]
        limit = CROWD_ADMITS * MINI_RESERVE + 5
        worst: dict[str, int] = {}
        stop = asyncio.Event()

        async def sample() -> None:
            # At no point may a row hold more than its limit: watch every row while the burst runs.
            async with live.db.acquire() as con:
                while not stop.is_set():
                    for row in await con.fetch(
                        "SELECT period_type, spent_credits_micro + reserved_credits_micro AS used"
                        " FROM quota_usage WHERE tenant_id = $1 AND user_id = $2",
                        CROWD_TENANT,
                        user,
                    ):
                        worst[row["period_type"]] = max(worst.get(row["period_type"], 0), row["used"])

        sampler = asyncio.create_task(sample())
        try:
            decisions = await live.gateway.decide(*commands, timeout=90)
        finally:
            stop.set()
            await sampler

    allowed = [d for d in decisions if d["decision"] == "allow"]
    rejected = [d for d in decisions if d["decision"] == "reject"]
    assert len(allowed) == CROWD_ADMITS
    assert len(rejected) == len(commands) - CROWD_ADMITS
    assert {(d["error_code"], d["quota_scope"]) for d in rejected} == {("quota_exceeded", "tokens")}
    assert worst["daily"] <= limit
    assert worst["daily"] == CROWD_ADMITS * MINI_RESERVE
