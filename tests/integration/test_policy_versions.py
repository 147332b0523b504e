"""Policy versions are facts: a worker records the version it decides with on `policy-versions`
before its first decision, and a rebuild applies each recorded decision under its own version.

One deployment, two policy files: version 1 (the packaged one), then version 2 (web search
disabled, generation floor 50 → 550, `gpt-5-nano` moved from the standard to the premium tier).
Turns are decided under version 1, the worker restarts under version 2, a version-1 turn settles
estimated after the restart (priced by version 1's floor), and version-2 turns are decided and
settled. A rebuild into an empty, migrated database must give the live digest.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from minichat.bench.scratch import delete_topics
from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.settings import PACKAGED_POLICY, Settings
from minichat.tools.kafka import read_topic
from minichat.tools.rebuild import run_rebuild
from tests.conftest import Deployment, deployment_settings
from tests.gateway import Event, Gateway, policy_file
from tests.support import (
    Endpoints,
    TopicReader,
    WorkerProcess,
    db_digest,
    run_worker,
    scratch_database,
    wait_until,
)

pytestmark = pytest.mark.integration

QUIET_WATCHDOG = {"orphan_timeout_s": 3600, "usage_grace_s": 3600, "watchdog_interval_s": 1}
"""The test writes every `usage.grace_expired` itself: the watchdog must add nothing."""


def _version_2_models() -> list[dict[str, Any]]:
    import yaml

    models: list[dict[str, Any]] = yaml.safe_load(PACKAGED_POLICY.read_text())["models"]
    return [{**m, "tier": "premium"} if m["id"] == "gpt-5-nano" else m for m in models]


@pytest.fixture
async def settings(endpoints: Endpoints, template_database: str, tmp_path: Path) -> AsyncIterator[Settings]:
    async with scratch_database(endpoints.database_url, "pv", template=template_database) as url:
        settings = deployment_settings(
            endpoints, url, policy_file=policy_file(tmp_path, version=1, **QUIET_WATCHDOG)
        )
        await create_topics(settings)
        try:
            yield settings
        finally:
            await delete_topics(settings)


@pytest.fixture
async def blank_database_url(endpoints: Endpoints, template_database: str) -> AsyncIterator[str]:
    """Migrated, nothing else."""
    async with scratch_database(endpoints.database_url, "pvr", template=template_database) as url:
        yield url


@contextmanager
def worker(settings: Settings, log: Path) -> Iterator[WorkerProcess]:
    with run_worker(Deployment(settings).env(), log) as proc:
        yield proc
        assert proc.terminate() == 0, proc.log()[-3000:]


async def settled_turn(db: asyncpg.Connection, command: Event) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT settlement_method, minimal_generation_floor_applied, policy_version_applied "
            "FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2 AND request_id = $3 "
            "AND settled_at IS NOT NULL",
            uuid.UUID(command["tenant_id"]),
            uuid.UUID(command["chat_id"]),
            uuid.UUID(command["request_id"]),
        )

    row: asyncpg.Record = await wait_until(check, timeout=60, what="the turn to settle")
    return row


async def test_a_rebuild_applies_each_decision_under_its_own_policy_version(
    settings: Settings, blank_database_url: str, tmp_path: Path
) -> None:
    names = TopicNames(settings.topic_prefix)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    chats = [uuid.uuid4() for _ in range(5)]
    con = await asyncpg.connect(settings.database_url)
    async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
        g = Gateway(settings, reader)

        # version 1: a web-search request, a standard-tier gpt-5-nano turn left running, and one
        # settled estimated at version 1's floor
        searching = g.requested(tenant, user, chats[0], web_search=True)
        nano_v1 = g.requested(tenant, user, chats[1], model="gpt-5-nano")
        early = g.requested(tenant, user, chats[2], model="gpt-5-nano")
        with worker(settings, tmp_path / "worker-v1.log"):
            decided = await g.decide(searching, nano_v1, early)
            assert [(d["decision"], d["policy_version"]) for d in decided] == [("allow", 1)] * 3
            await g.send_provider(
                g.provider(
                    "turn.completed",
                    searching,
                    content="found",
                    usage={"input_tokens": 120, "output_tokens": 40},
                ),
                g.provider("turn.completed", early, content="short"),
            )
            await g.send_usage(g.provider("usage.grace_expired", early))
            assert (await settled_turn(con, early))["minimal_generation_floor_applied"] == 50

        # version 2: web search off, floor 550, gpt-5-nano on the premium tier
        v2 = policy_file(
            tmp_path,
            version=2,
            models=_version_2_models(),
            kill_switches={"disable_web_search": True},
            estimation={"minimal_generation_floor": 550},
            **QUIET_WATCHDOG,
        )
        settings_v2 = settings.model_copy(update={"policy_file": v2})
        nano_v2 = g.requested(tenant, user, chats[3], model="gpt-5-nano")
        refused = g.requested(tenant, user, chats[4], web_search=True)
        with worker(settings_v2, tmp_path / "worker-v2.log"):
            # the version-1 turn settles now, priced by its own version's floor
            await g.send_provider(g.provider("turn.completed", nano_v1, content="later"))
            await g.send_usage(g.provider("usage.grace_expired", nano_v1))
            old = await settled_turn(con, nano_v1)
            assert (old["settlement_method"], old["minimal_generation_floor_applied"]) == ("estimated", 50)
            decided = await g.decide(nano_v2, refused)
            assert [(d["decision"], d["error_code"], d["policy_version"]) for d in decided] == [
                ("allow", None, 2),
                ("reject", "web_search_disabled", 2),
            ]
            await g.send_provider(g.provider("turn.completed", nano_v2, content="new"))
            await g.send_usage(g.provider("usage.grace_expired", nano_v2))
            new = await settled_turn(con, nano_v2)
            assert (new["settlement_method"], new["minimal_generation_floor_applied"]) == ("estimated", 550)
            premium = await con.fetchval(
                "SELECT count(*) FROM quota_usage WHERE tenant_id = $1 AND bucket = 'tier:premium'", tenant
            )
            assert premium > 0  # version 2 reserved gpt-5-nano on the premium tier
            live = await db_digest(settings.database_url)
    await con.close()

    rebuilt_settings = settings_v2.model_copy(update={"database_url": blank_database_url})
    summary = await run_rebuild(rebuilt_settings, show_progress=False, check_workers=False)
    assert summary.dead_lettered == 0
    rebuilt = await db_digest(blank_database_url)
    assert rebuilt.tables == live.tables
    assert rebuilt == live

    # both versions are facts on the compacted topic, keyed by version
    logged = {key for key, _ in await read_topic(settings, names.full("policy-versions"))}
    assert logged == {b"1", b"2"}
