"""A three-broker Kafka cluster for fault tests: `scripts/stack.sh`'s three-broker mode
(`MINICHAT_STACK_KAFKA_BROKERS=3`: three KRaft nodes, each broker + controller, replication factor 3,
`min.insync.replicas=2`, no unclean leader election), in a state dir of its own and on ports of its
own, next to the single-broker stack the other tests use.

The `cluster` fixture (session-scoped) starts it, or reuses it when it already runs (a developer
can keep one up between runs: `MINICHAT_STACK_DIR=... MINICHAT_STACK_KAFKA_BROKERS=3 scripts/stack.sh
up-kafka`), and stops and deletes it afterwards only when it started it. PostgreSQL stays the
session's (`endpoints`): `Cluster.endpoints` combines the two.

Clock skew: `restart(node, faketime="+2s")` restarts one node with its wall clock off by the offset
(libfaketime; `scripts/stack.sh`, `MINICHAT_STACK_KAFKA_NODE<N>_FAKETIME`), `restart(node)` without
it; `prefer` places partition leaders on chosen nodes (a replica order changed by a reassignment;
the cluster moves leaders to their preferred replica within seconds).

Environment (optional): `MINICHAT_TEST_CLUSTER_DIR` (state dir, default
`<tmp>/minichat-test-cluster`), `MINICHAT_TEST_CLUSTER_PORT` / `MINICHAT_TEST_CLUSTER_CONTROLLER_PORT`
(first broker / controller port, default 9192 / 9292; node N uses port + N - 1),
`MINICHAT_STACK_KAFKA_LIBS` (jar cache; default the repository stack's, `.stack/kafka/libs`, when it
exists, so no Maven download).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import AlterPartitionReassignmentsRequest

from tests.support import ROOT, Endpoints, wait_until

STACK = ROOT / "scripts" / "stack.sh"
BROKERS = 3
OFFSETS_TOPIC = "__consumer_offsets"


def _stack_env() -> dict[str, str]:
    directory = os.environ.get("MINICHAT_TEST_CLUSTER_DIR") or str(
        Path(tempfile.gettempdir()) / "minichat-test-cluster"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICHAT_STACK_")}
    env.update(
        MINICHAT_STACK_DIR=directory,
        MINICHAT_STACK_KAFKA_BROKERS=str(BROKERS),
        MINICHAT_STACK_KAFKA_PORT=os.environ.get("MINICHAT_TEST_CLUSTER_PORT", "9192"),
        MINICHAT_STACK_KAFKA_CONTROLLER_PORT=os.environ.get("MINICHAT_TEST_CLUSTER_CONTROLLER_PORT", "9292"),
    )
    libs = os.environ.get("MINICHAT_STACK_KAFKA_LIBS")
    if not libs and (ROOT / ".stack" / "kafka" / "libs" / ".stamp").exists():
        libs = str(ROOT / ".stack" / "kafka" / "libs")
    if libs:
        env["MINICHAT_STACK_KAFKA_LIBS"] = libs
    return env


@dataclass
class Cluster:
    """The running cluster: its bootstrap list, one node killed or started at a time, and its
    metadata (a partition's leader, whether every replica is back in sync)."""

    bootstrap: str
    env: dict[str, str]
    started_here: bool = False
    kills: int = 0
    """SIGKILLs so far (all tests of the session)."""

    def stack(self, *args: str, timeout: float = 180) -> str:
        """`scripts/stack.sh ARGS` on the cluster's state dir; its stdout."""
        done = subprocess.run(
            [str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if done.returncode != 0:
            raise AssertionError(f"stack.sh {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def endpoints(self, base: Endpoints) -> Endpoints:
        """The session's PostgreSQL with this cluster's brokers."""
        return Endpoints(self.bootstrap, base.database_url, base.runtime_url)

    def kill(self, node: int) -> None:
        """SIGKILL node `node` (its node id): no controlled shutdown, its data stays."""
        self.stack("kill-broker", str(node))
        self.kills += 1

    def start(self, node: int) -> None:
        """Start node `node` again; returns once it answers."""
        self.stack("start-broker", str(node))

    def restart(self, node: int, faketime: str | None = None) -> None:
        """Stop node `node` gracefully (its partitions led elsewhere first) and start it again,
        with its wall clock off by `faketime` (a libfaketime offset: "+2s", "-0.05s") or true."""
        self.stack("stop-broker", str(node))
        variable = f"MINICHAT_STACK_KAFKA_NODE{node}_FAKETIME"
        env = {**self.env, variable: faketime or ""}
        done = subprocess.run(
            [str(STACK), "start-broker", str(node)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
        )
        if done.returncode != 0:
            raise AssertionError(f"stack.sh start-broker {node} failed ({done.returncode}):\n{done.stderr}")

    def running(self) -> dict[int, bool]:
        """Node id -> running, per `stack.sh brokers`."""
        lines = [line.split() for line in self.stack("brokers").splitlines() if line.strip()]
        return {int(cols[1]): cols[4] == "running" for cols in lines}

    def skews(self) -> dict[int, str]:
        """Node id -> the clock offset it runs with ("0": none), per `stack.sh brokers`."""
        lines = [line.split() for line in self.stack("brokers").splitlines() if line.strip()]
        return {int(cols[1]): cols[5] if len(cols) > 5 else "0" for cols in lines}

    async def prefer(self, replicas: dict[tuple[str, int], list[int]], *, timeout: float = 60) -> None:
        """Give each (topic, partition) the replica order `replicas` (same replica set, first one
        preferred) and wait until every one of them is led by its first replica."""
        topics: dict[str, list[tuple[int, list[int], dict[int, Any]]]] = {}
        for (topic, partition), order in replicas.items():
            topics.setdefault(topic, []).append((partition, order, {}))
        request = AlterPartitionReassignmentsRequest(
            30_000, [(topic, parts, {}) for topic, parts in topics.items()], {}
        )
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=30_000)
        await admin.start()
        try:
            response = await admin._send_to_controller(request)
        finally:
            await admin.close()
        errors = [(r[0], p[0], p[1]) for r in response.responses for p in r[1] if p[1]] + (
            [("*", -1, response.error_code)] if response.error_code else []
        )
        assert not errors, f"reassignment refused: {errors}"

        async def placed() -> bool:
            described = await self.describe(sorted(topics))
            if not described:
                return False
            leaders = {(t["topic"], p["partition"]): p["leader"] for t in described for p in t["partitions"]}
            return all(leaders.get(key) == order[0] for key, order in replicas.items())

        await wait_until(placed, timeout=timeout, what="the chosen partition leaders")

    async def describe(self, topics: list[str]) -> list[dict[str, Any]] | None:
        """The topics' metadata (partitions with leader, replicas, isr); None while the cluster
        does not answer (a node just killed may be the one asked)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            described: list[dict[str, Any]] = await admin.describe_topics(topics)
            return described
        except (KafkaError, OSError):
            return None
        finally:
            await admin.close()

    async def leader(self, topic: str, partition: int, *, timeout: float = 30) -> int:
        """The node id leading `topic`'s `partition`."""

        async def found() -> int | None:
            for described in await self.describe([topic]) or []:
                for p in described["partitions"]:
                    if p["partition"] == partition and p["leader"] >= 0:
                        return int(p["leader"])
            return None

        return await wait_until(found, timeout=timeout, what=f"a leader of {topic}[{partition}]")

    async def wait_in_sync(self, topics: list[str], *, timeout: float = 60) -> None:
        """Until every partition of `topics` and of the offsets topic has a leader and all its
        replicas in sync (a restarted node caught up): the state before the next fault."""

        async def in_sync() -> bool:
            described = await self.describe([*topics, OFFSETS_TOPIC])
            if not described or any(t["error_code"] for t in described):
                return False
            return all(
                p["leader"] >= 0 and len(p["isr"]) == len(p["replicas"]) == BROKERS
                for t in described
                for p in t["partitions"]
            )

        await wait_until(in_sync, timeout=timeout, what="every replica in sync")


def _bootstrap(exports: str) -> str:
    for line in exports.splitlines():
        if line.startswith("export MINICHAT_KAFKA_BOOTSTRAP_SERVERS="):
            return line.split("=", 1)[1]
    raise AssertionError(f"stack.sh printed no bootstrap servers:\n{exports}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The three-broker cluster (started here unless it already runs; then left running)."""
    env = _stack_env()
    probe = Cluster("", env)
    already = all(probe.running().values()) if Path(env["MINICHAT_STACK_DIR"]).exists() else False
    probe.started_here = not already
    try:
        probe.bootstrap = _bootstrap(probe.stack("up-kafka"))
        yield probe
    finally:
        if probe.started_here:
            probe.stack("down", "--purge")
