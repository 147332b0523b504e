"""A policy change mid-run on the three-broker cluster: the workers restart one after the other
with a new policy version while the gateway simulator's traffic runs, and a rebuild into an empty
database still has the live digest (each recorded decision applied under its own version).

Two workers decide the traffic (rounds of `run_simulation`, as in test_crash.py). A changer,
`changes` times: waits until both are ready, pauses a seeded 0.5-2 s, writes version v + 1 of the
policy (the generation floor alternating 50 / 550, which prices every estimated settlement) and
restarts worker 0 then worker 1 on it (SIGTERM, start): for a while the two decide under different
versions. Then, as in every cluster run: nothing lost or duplicated, every command answered,
digest(live) == digest(rebuild), and every version is a fact on `policy-versions`.

Sizes: `MINICHAT_CLUSTER_POLICY_CHANGES` (default 2) in the CI version; the soak version (marker
`soak`, `make soak-cluster`) at least 50.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import random
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.tools.kafka import read_topic
from minichat.tools.simulator import SimulateOptions
from tests.cluster import Cluster
from tests.conftest import Deployment, deployment_settings
from tests.integration.cluster_checks import verify
from tests.integration.test_crash import (
    CI_ROUND,
    READY_TIMEOUT,
    SESSION_TIMEOUT_S,
    SOAK_ROUND,
    Fleet,
    crash_policy,
    fresh_database,
    play_rounds,
    soak_selected,
)
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration

CHANGES_ENV = "MINICHAT_CLUSTER_POLICY_CHANGES"
CI_CHANGES = int(os.environ.get(CHANGES_ENV) or 2)
SOAK_CHANGES = max(50, CI_CHANGES)
PAUSE_S = (0.5, 2.0)
FLOORS = (50, 550)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    changes: int
    round: SimulateOptions
    seed: int
    soak: bool = False


VARIANTS = [
    Variant("policy-changes", CI_CHANGES, CI_ROUND, seed=24),
    Variant("soak-policy-changes", SOAK_CHANGES, SOAK_ROUND, seed=25, soak=True),
]


def _param(variant: Variant) -> Any:
    marks = [pytest.mark.timeout(240 + 30 * variant.changes)]
    if variant.soak:
        marks.append(pytest.mark.soak)
    return pytest.param(variant, id=variant.name, marks=marks)


def write_version(base: Path, version: int) -> Path:
    """Policy `version`: the base file with its version and an alternating generation floor."""
    policy = yaml.safe_load(base.read_text())
    policy["version"] = version
    policy["estimation"] = {**policy["estimation"], "minimal_generation_floor": FLOORS[version % 2]}
    path = base.with_name(f"policy-v{version}.yaml")
    path.write_text(yaml.safe_dump(policy))
    return path


async def change_policies(
    fleet: Fleet, base: Path, changes: int, rng: random.Random, done: list[int]
) -> None:
    """`changes` times: version + 1, worker 0 then worker 1 restarted on it, each once the other
    is ready (so one keeps deciding)."""

    def ready(i: int) -> Any:
        async def check() -> bool:
            fleet.check_alive()
            return fleet.ready(i)

        return check

    for i in range(len(fleet.workers)):
        await wait_until(ready(i), timeout=READY_TIMEOUT, what=f"worker {i} to be ready")
    for change in range(changes):
        # The random moment of the change is the thing under test: a deliberate pause.
        await asyncio.sleep(rng.uniform(*PAUSE_S))
        version = change + 2
        fleet.env["MINICHAT_POLICY_FILE"] = str(write_version(base, version))
        for i in range(len(fleet.workers)):
            fleet.check_alive()
            status = await asyncio.to_thread(fleet.workers[i].terminate)
            assert status == 0, f"worker {i} exited {status} on SIGTERM:\n{fleet.workers[i].log()[-3000:]}"
            fleet.restart(i)
            await wait_until(
                ready(i), timeout=READY_TIMEOUT, what=f"worker {i} to be ready on version {version}"
            )
        done.append(version)


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
async def test_policy_change_mid_run_loses_nothing_and_rebuild_matches(
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
    progress = io.StringIO()
    on_cluster = cluster.endpoints(endpoints)
    async with (
        fresh_database(on_cluster, template_database, "policy") as live_url,
        fresh_database(on_cluster, template_database, "policyrebuilt") as rebuilt_url,
    ):
        base = crash_policy(tmp_path)
        first = write_version(base, 1)
        settings = deployment_settings(on_cluster, live_url, policy_file=first)
        names = TopicNames(settings.topic_prefix)
        await create_topics(settings)
        env = {**Deployment(settings).env(), "MINICHAT_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S}
        versions: list[int] = []
        with ExitStack() as stack:
            fleet = Fleet(env, tmp_path, stack, 2)
            changer = asyncio.create_task(
                change_policies(fleet, base, variant.changes, random.Random(variant.seed), versions)
            )
            try:
                results = await play_rounds(settings, variant.round, changer, progress)
                await changer
                fleet.check_alive()
            except BaseException:
                changer.cancel()
                print(progress.getvalue()[-4000:], fleet.tails())
                raise
            verdict = await verify(settings, fleet, rebuilt_url)

        failures = list(verdict.failures)
        failures.extend(f"simulator: {p}" for r in results for p in r.problems)
        # (a decision of a command refused before any policy applied names no version)
        decided = {
            json.loads(v).get("policy_version")
            for _, v in await read_topic(settings, names.turn_decisions)
            if v
        } - {None}
        logged = {int(k) for k, _ in await read_topic(settings, names.full("policy-versions")) if k}
        wanted = set(range(1, variant.changes + 2))
        if logged != wanted:
            failures.append(f"policy-versions holds {sorted(logged)}, not {sorted(wanted)}")
        if len(decided) < 2 or not decided <= wanted:
            failures.append(f"decisions under versions {sorted(decided)} (of {sorted(wanted)})")
    print(
        f"policy change[{variant.name}]: {len(versions)} changes (versions 1-{variant.changes + 1}, "
        f"decisions under {len(decided)} of them), {len(results)} simulator round(s); {verdict.line()}; "
        f"{time.monotonic() - began:.0f} s"
    )
    assert len(versions) == variant.changes
    assert not failures, "\n\n".join([*failures, verdict.books, progress.getvalue()[-4000:], verdict.logs])
