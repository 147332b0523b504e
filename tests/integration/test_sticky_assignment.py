"""Partition sets stay with their workers when others join or leave (docs/architecture.md, "The
ordered engine"; docs/guarantees.md).

Real worker processes on the real broker: two workers, then a third joins, then one of the first
two stops. After each change every surviving worker still owns the sets it owned before (a joining
worker takes only its share, a leaving worker's sets are the only ones that move), all three topics'
partition *p* sit with one worker, and every command sent across the changes is decided.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from minichat.bench.scratch import delete_topics
from minichat.models.topics import TopicNames
from minichat.processors.engine import RESUMED
from minichat.processors.topics import create_topics
from minichat.settings import Settings
from tests.conftest import Deployment, deployment_settings
from tests.gateway import Event, Gateway
from tests.support import Endpoints, TopicReader, WorkerProcess, run_worker, scratch_database, wait_until

pytestmark = pytest.mark.integration

SETS = 6
RESUMED_LINE = re.compile(re.escape(RESUMED) + r" (\d+) input partition\(s\), partition sets \[([\d, ]*)\]")
REBALANCE_TIMEOUT = 90.0


def resumed(worker: WorkerProcess) -> list[frozenset[int]]:
    """Every assignment the worker resumed with, in order (its "partition sets [..]" lines)."""
    found = []
    for lanes, numbers in RESUMED_LINE.findall(worker.log()):
        sets = frozenset(int(n) for n in numbers.split(",") if n.strip())
        assert int(lanes) == 3 * len(sets), (lanes, numbers)  # every topic's p with one worker
        found.append(sets)
    return found


class Fleet:
    def __init__(self, settings: Settings, workdir: Path, stack: ExitStack) -> None:
        self.env = Deployment(settings).env()
        self.workdir, self.stack = workdir, stack
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, name: str) -> None:
        self.workers[name] = self.stack.enter_context(run_worker(self.env, self.workdir / f"{name}.log"))

    def stop(self, name: str) -> None:
        worker = self.workers.pop(name)
        assert worker.terminate() == 0, worker.log()[-3000:]

    async def settled(self, seen: dict[str, int]) -> dict[str, frozenset[int]]:
        """Wait until every running worker resumed after `seen` (its count of resumed lines before
        the change) and together they own every set exactly once; their sets."""

        async def check() -> dict[str, frozenset[int]] | None:
            latest: dict[str, frozenset[int]] = {}
            for name, worker in self.workers.items():
                assert worker.proc.poll() is None, worker.log()[-3000:]
                lines = resumed(worker)
                if len(lines) <= seen.get(name, 0):
                    return None
                latest[name] = lines[-1]
            owned = [p for sets in latest.values() for p in sets]
            return latest if sorted(owned) == list(range(SETS)) else None

        return await wait_until(check, timeout=REBALANCE_TIMEOUT, what="a settled assignment")

    def counts(self) -> dict[str, int]:
        return {name: len(resumed(w)) for name, w in self.workers.items()}


@pytest.fixture
async def deployment(endpoints: Endpoints, template_database: str) -> AsyncIterator[Settings]:
    async with scratch_database(endpoints.database_url, "s", template=template_database) as url:
        settings = deployment_settings(endpoints, url, partitions=SETS)
        await create_topics(settings)
        try:
            yield settings
        finally:
            await delete_topics(settings)


def balanced(owned: dict[str, frozenset[int]]) -> bool:
    counts = [len(s) for s in owned.values()]
    return max(counts) - min(counts) <= 1


async def test_sets_stay_with_surviving_workers_as_workers_join_and_leave(
    deployment: Settings, tmp_path: Path
) -> None:
    settings = deployment
    tenant = uuid.uuid4()
    async with TopicReader(
        settings.kafka_bootstrap_servers, TopicNames(settings.topic_prefix).turn_decisions
    ) as reader:
        g = Gateway(settings, reader)

        def commands(n: int) -> list[Event]:
            return [g.requested(tenant, uuid.uuid4(), uuid.uuid4()) for _ in range(n)]

        with ExitStack() as stack:
            fleet = Fleet(settings, tmp_path, stack)
            fleet.start("a")
            fleet.start("b")
            two = await fleet.settled({})
            assert set(two) == {"a", "b"} and balanced(two), two
            sent = commands(24)
            answered = await g.decide(*sent, timeout=REBALANCE_TIMEOUT)
            assert [d["decision"] for d in answered] == ["allow"] * len(sent)

            # a third worker joins while commands are in flight
            during_join = commands(24)
            await g.send(*during_join)
            seen = fleet.counts()
            fleet.start("c")
            three = await fleet.settled(seen)
            assert balanced(three), three
            for name in ("a", "b"):
                assert three[name] <= two[name], (name, two, three)  # a survivor only gave sets up
            moved = len(three["c"])
            assert moved <= math.ceil(SETS / 3), three

            # a worker leaves (stops cleanly) while commands are in flight
            during_leave = commands(24)
            await g.send(*during_leave)
            seen = fleet.counts()
            fleet.stop("a")
            after = await fleet.settled(seen)
            assert set(after) == {"b", "c"} and balanced(after), after
            for name in ("b", "c"):
                assert three[name] <= after[name], (name, three, after)  # nothing of theirs moved
            assert after["b"] | after["c"] == three["a"] | three["b"] | three["c"]

            answers = await g.answers(during_join + during_leave, timeout=REBALANCE_TIMEOUT)
            assert [d["decision"] for d in answers] == ["allow"] * len(during_join + during_leave)
            last = commands(12)
            assert [d["decision"] for d in await g.decide(*last, timeout=REBALANCE_TIMEOUT)] == ["allow"] * 12

            for name in list(fleet.workers):
                fleet.stop(name)
