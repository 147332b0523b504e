"""Broker failover on a three-broker cluster (tests/cluster.py) loses nothing, and the log rebuilds
the same books.

`minichat topics create` makes the topics at replication factor 3 with `min.insync.replicas` 2 (the
default on three brokers, checked on the cluster's metadata). One worker decides the gateway
simulator's traffic (rounds of `run_simulation`, as in test_crash.py) while a breaker, `kills`
times: waits until every replica is in sync, pauses a seeded 0.5-2 s, SIGKILLs the node that leads
`turn-requests` partition 0 (`scripts/stack.sh kill-broker`) and starts it again
(`start-broker`). Each kill takes a leader away from the worker's consumer and producer, the
gateway's producer, and sometimes the group coordinator or the controller quorum's leader.

Then, as in test_crash.py: the deployment is quiescent, the simulator's checks of the books hold,
every command has a decision (re-sends identical), the worker stops gracefully, and a rebuild of
an empty database from the topics has the live database's digest.

Sizes: `MINICHAT_CLUSTER_KILLS` kills (default 3) in the CI version; the soak version (marker
`soak`, `make soak-cluster`) does at least 50.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import random
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.tools.simulator import SimulateOptions
from tests.cluster import BROKERS, Cluster
from tests.conftest import Deployment, deployment_settings
from tests.integration.cluster_checks import verify
from tests.integration.test_crash import (
    CI_ROUND,
    SESSION_TIMEOUT_S,
    SOAK_ROUND,
    Fleet,
    crash_policy,
    fresh_database,
    play_rounds,
    soak_selected,
)
from tests.support import Endpoints, run_cli, wait_until

pytestmark = pytest.mark.integration

KILLS_ENV = "MINICHAT_CLUSTER_KILLS"
CI_KILLS = int(os.environ.get(KILLS_ENV) or 3)
SOAK_KILLS = max(50, CI_KILLS)
PAUSE_S = (0.5, 2.0)
"""A kill lands this long (uniform, seeded) after every replica was back in sync."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kills: int
    round: SimulateOptions
    seed: int
    soak: bool = False


VARIANTS = [
    Variant("broker-kills", CI_KILLS, CI_ROUND, seed=22),
    Variant("soak-broker-kills", SOAK_KILLS, SOAK_ROUND, seed=23, soak=True),
]


def _param(variant: Variant) -> Any:
    marks = [pytest.mark.timeout(180 + 30 * variant.kills)]
    if variant.soak:
        marks.append(pytest.mark.soak)
    return pytest.param(variant, id=variant.name, marks=marks)


async def topic_layout(bootstrap: str, names: list[str]) -> dict[str, tuple[set[int], str]]:
    """Per topic: its partitions' replica counts, and its `min.insync.replicas`. The broker asked
    may not have replayed a just-made topic yet (an error, or no entries): asked again until it has."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        replicas: dict[str, set[int]] = {}
        insync: dict[str, str] = {}

        async def described() -> bool:
            for t in await admin.describe_topics(names):
                if t["error_code"] == 0 and t["partitions"]:
                    replicas[t["topic"]] = {len(p["replicas"]) for p in t["partitions"]}
            resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
            for response in await admin.describe_configs(resources):
                for code, _msg, _type, name, entries in response.resources:
                    value = dict((e[0], e[1]) for e in entries).get("min.insync.replicas")
                    if code == 0 and value is not None:
                        insync[name] = value
            return all(n in insync and n in replicas for n in names)

        await wait_until(described, timeout=30, what="every topic's configuration to be described")
        return {n: (replicas[n], insync[n]) for n in names}
    finally:
        await admin.close()


@dataclasses.dataclass
class Breaks:
    kills: int = 0
    leaders: list[int] = dataclasses.field(default_factory=list)
    restart_s: list[float] = dataclasses.field(default_factory=list)
    in_sync_s: list[float] = dataclasses.field(default_factory=list)


async def break_leaders(
    cluster: Cluster, fleet: Fleet, topic: str, topics: list[str], kills: int, rng: random.Random, log: Breaks
) -> None:
    """SIGKILL the leader of `topic`[0] `kills` times, each once every replica is in sync and the
    worker is up; restart it at once. Ends with every replica in sync again."""

    async def worker_ready() -> bool:
        fleet.check_alive()
        return fleet.ready(0)

    await wait_until(worker_ready, timeout=90, what="the worker to resume")
    for _ in range(kills):
        began = time.monotonic()
        await cluster.wait_in_sync(topics, timeout=90)
        log.in_sync_s.append(time.monotonic() - began)
        # The random moment of the kill is the thing under test: a deliberate pause.
        await asyncio.sleep(rng.uniform(*PAUSE_S))
        fleet.check_alive()
        leader = await cluster.leader(topic, 0)
        await asyncio.to_thread(cluster.kill, leader)
        log.kills += 1
        log.leaders.append(leader)
        began = time.monotonic()
        await asyncio.to_thread(cluster.start, leader)
        log.restart_s.append(time.monotonic() - began)
    await cluster.wait_in_sync(topics, timeout=90)


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
async def test_broker_kills_lose_nothing_and_rebuild_matches(
    variant: Variant,
    cluster: Cluster,
    endpoints: Endpoints,
    template_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if variant.soak and not soak_selected(request.config):
        pytest.skip("soak test: run it with `make soak-cluster`")
    began = time.monotonic()
    failures: list[str] = []
    progress = io.StringIO()

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    on_cluster = cluster.endpoints(endpoints)
    async with (
        fresh_database(on_cluster, template_database, "cluster") as live_url,
        fresh_database(on_cluster, template_database, "rebuilt") as rebuilt_url,
    ):
        settings = deployment_settings(on_cluster, live_url, policy_file=crash_policy(tmp_path))
        names = TopicNames(settings.topic_prefix)
        report = await create_topics(settings)
        assert report.replication_factor == BROKERS
        layout = await topic_layout(settings.kafka_bootstrap_servers, names.all())
        assert layout == {n: ({3}, "2") for n in names.all()}, layout

        env = {**Deployment(settings).env(), "MINICHAT_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S}
        breaks = Breaks()
        with ExitStack() as stack:
            fleet = Fleet(env, tmp_path, stack, 1)
            breaker = asyncio.create_task(
                break_leaders(
                    cluster,
                    fleet,
                    names.turn_requests,
                    names.all(),
                    variant.kills,
                    random.Random(variant.seed),
                    breaks,
                )
            )
            try:
                results = await play_rounds(settings, variant.round, breaker, progress)
                await breaker
                fleet.check_alive()
            except BaseException:
                breaker.cancel()
                print(progress.getvalue()[-4000:], fleet.tails())
                raise
            failures.extend(f"simulator: {p}" for r in results for p in r.problems)
            verdict = await verify(settings, fleet, rebuilt_url)
        failures.extend(verdict.failures)
        restart_s = sum(breaks.restart_s) / max(1, len(breaks.restart_s))
        print(
            f"cluster[{variant.name}]: {breaks.kills} SIGKILLs of the leader of turn-requests[0] "
            f"(nodes {breaks.leaders}; restart {restart_s:.1f} s on average), {len(results)} simulator "
            f"round(s), {verdict.line()}; {time.monotonic() - began:.0f} s"
        )
        check(breaks.kills == variant.kills, f"{breaks.kills} kills of {variant.kills}")
        evidence = [*failures, verdict.books, progress.getvalue()[-4000:], verdict.logs]
        assert not failures, "\n\n".join(evidence)


async def test_topics_create_on_three_brokers(cluster: Cluster, endpoints: Endpoints) -> None:
    """Factor 3 and `min.insync.replicas` 2 by default, idempotently; topics made at another
    factor are reported (exit status 2, each topic and its factor named), never silently kept."""
    settings = deployment_settings(cluster.endpoints(endpoints), "postgresql://unused/unused", partitions=2)
    names = TopicNames(settings.topic_prefix).all()
    first, second = await create_topics(settings), await create_topics(settings)
    assert (first.created, first.replication_factor) == (names, 3)
    assert (second.created, second.existing, second.reconfigured) == ([], names, [])
    assert await topic_layout(settings.kafka_bootstrap_servers, names) == {n: ({3}, "2") for n in names}

    single = settings.model_copy(
        update={"topic_prefix": f"{settings.topic_prefix}one.", "replication_factor": 1}
    )
    await create_topics(single)
    one = TopicNames(single.topic_prefix).all()
    assert await topic_layout(settings.kafka_bootstrap_servers, one) == {n: ({1}, "1") for n in one}
    env = {
        "MINICHAT_KAFKA_BOOTSTRAP_SERVERS": single.kafka_bootstrap_servers,
        "MINICHAT_TOPIC_PREFIX": single.topic_prefix,
        "MINICHAT_PARTITIONS": "2",
    }
    done = await asyncio.to_thread(run_cli, env, "topics", "create")
    assert done.returncode == 2, done
    assert "replication factor differs from the wanted 3" in done.stderr
    assert all(f"{n} has 1" in done.stderr for n in one), done.stderr
