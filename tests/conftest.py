"""Where the real Kafka broker and PostgreSQL come from, in this order:

1. services named by the environment (`MINICHAT_KAFKA_BOOTSTRAP_SERVERS`, `MINICHAT_DATABASE_URL`),
   which is what `make test` and CI do after `scripts/stack.sh up`;
2. testcontainers, when a Docker daemon answers a ping;
3. the native stack (`scripts/stack.sh up`: Kafka from Maven Central jars, Debian's PostgreSQL).

Each test then gets its own topics (a fresh prefix) and its own database (a copy of a migrated
template), so tests never see each other's data.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest

from minichat.bench.scratch import delete_topics
from minichat.models.topics import TopicNames
from minichat.settings import Settings
from tests.cluster import cluster  # noqa: F401  (the three-broker cluster fixture)
from tests.gateway import Gateway
from tests.support import (
    ROOT,
    Endpoints,
    TopicReader,
    WorkerProcess,
    as_runtime,
    new_prefix,
    run_worker,
    scratch_database,
    use_runtime_login,
)


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # no daemon, no socket, no permission: all mean "not available"
        return False


def _testcontainers(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"testcontainers.community.{name}")
    except ImportError:
        return importlib.import_module(f"testcontainers.{name}")


def _native_stack() -> Endpoints:
    out = subprocess.run(
        [str(ROOT / "scripts" / "stack.sh"), "up"], check=True, capture_output=True, text=True, timeout=900
    ).stdout
    env = dict(
        line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export ")
    )
    return stack_endpoints(env)


def stack_endpoints(env: Mapping[str, str]) -> Endpoints:
    """`MINICHAT_ADMIN_DATABASE_URL` (else `MINICHAT_DATABASE_URL`) for the tests' own database
    work; `MINICHAT_DATABASE_URL`, when it is another login, for the worker processes."""
    database = env["MINICHAT_DATABASE_URL"]
    admin = env.get("MINICHAT_ADMIN_DATABASE_URL") or database
    return Endpoints(env["MINICHAT_KAFKA_BOOTSTRAP_SERVERS"], admin, database if admin != database else None)


@pytest.fixture(scope="session")
def endpoints() -> Iterator[Endpoints]:
    """Worker processes use the runtime login when the stack has one (`Deployment.env`)."""
    for found in _endpoints():
        use_runtime_login(found.runtime_url)
        yield found


def _endpoints() -> Iterator[Endpoints]:
    if os.environ.get("MINICHAT_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("MINICHAT_DATABASE_URL"):
        yield stack_endpoints(os.environ)
        return
    if _docker_available():
        image = os.environ.get("MINICHAT_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.9.2")
        with (
            _testcontainers("kafka").KafkaContainer(image).with_kraft() as kc,
            _testcontainers("postgres").PostgresContainer("postgres:15", driver=None) as pg,
        ):
            yield Endpoints(kc.get_bootstrap_server(), pg.get_connection_url())
        return
    yield _native_stack()


@pytest.fixture(scope="session")
async def template_database(endpoints: Endpoints) -> AsyncIterator[str]:
    """A migrated database that every test's database is copied from (about 0.1 s a copy)."""
    from minichat.storage.schema import migrate

    async with scratch_database(endpoints.database_url, "tpl") as url:
        con = await asyncpg.connect(url)
        try:
            await migrate(con)
        finally:
            await con.close()
        yield url.rsplit("/", 1)[-1]


@pytest.fixture
async def database_url(endpoints: Endpoints, template_database: str) -> AsyncIterator[str]:
    async with scratch_database(endpoints.database_url, "t", template=template_database) as url:
        yield url


@pytest.fixture
async def empty_database_url(endpoints: Endpoints) -> AsyncIterator[str]:
    """A database with no schema at all, for migration tests."""
    async with scratch_database(endpoints.database_url, "e") as url:
        yield url


@dataclass(frozen=True)
class Deployment:
    """One isolated minichat deployment: its own topics, group and database."""

    settings: Settings

    def env(self) -> dict[str, str]:
        """A worker's environment: its own login (the runtime one, when the stack has one) on the
        deployment's database; `db` commands use the admin login (`settings.database_url`)."""
        s = self.settings
        return {
            "MINICHAT_KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
            "MINICHAT_DATABASE_URL": as_runtime(s.database_url),
            "MINICHAT_ADMIN_DATABASE_URL": s.admin_url,
            "MINICHAT_TOPIC_PREFIX": s.topic_prefix,
            "MINICHAT_GROUP_ID": s.group_id,
            "MINICHAT_PARTITIONS": str(s.partitions),
            "MINICHAT_POLICY_FILE": str(s.policy_file),
            "MINICHAT_WEB_ENABLED": "false",
            "MINICHAT_LOG_LEVEL": "INFO",
        }


def deployment_settings(endpoints: Endpoints, database_url: str, **overrides: object) -> Settings:
    prefix = new_prefix()
    values: dict[str, object] = {
        "kafka_bootstrap_servers": endpoints.kafka,
        "database_url": database_url,
        # the same database as the admin login (never MINICHAT_ADMIN_DATABASE_URL's, the stack's own)
        "admin_database_url": None,
        "topic_prefix": prefix,
        "group_id": f"{prefix}workers",
        "partitions": 4,
        "web_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def deployment(endpoints: Endpoints, database_url: str) -> AsyncIterator[Deployment]:
    """Migrated database and created topics, nothing running; the topics are deleted afterwards
    (a development broker would otherwise keep every test run's topics)."""
    from minichat.processors.topics import create_topics

    settings = deployment_settings(endpoints, database_url)
    await create_topics(settings)
    try:
        yield Deployment(settings)
    finally:
        await delete_topics(settings)


@dataclass
class Live:
    """A running deployment: worker process(es), a decisions reader, a gateway and a database pool."""

    settings: Settings
    workers: list[WorkerProcess]
    gateway: Gateway
    db: asyncpg.Pool

    def logs(self) -> str:
        return "\n".join(w.log()[-4000:] for w in self.workers)


@asynccontextmanager
async def live_deployment(
    endpoints: Endpoints,
    template_database: str,
    workdir: Path,
    *,
    policy: Path | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Live]:
    """A deployment with running worker process(es); `env` overrides their environment. Its topics
    are deleted afterwards (a development broker would otherwise keep every test run's topics)."""
    from minichat.processors.topics import create_topics

    overrides: dict[str, object] = {"policy_file": policy} if policy else {}
    async with scratch_database(endpoints.database_url, "l", template=template_database) as url:
        settings = deployment_settings(endpoints, url, **overrides)
        name = url.rsplit("/", 1)[-1]
        await create_topics(settings)
        try:
            worker_env = {**Deployment(settings).env(), **(env or {})}
            with ExitStack() as stack:
                procs = [
                    stack.enter_context(run_worker(worker_env, workdir / f"worker-{name}-{i}.log"))
                    for i in range(workers)
                ]
                pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
                try:
                    async with TopicReader(
                        settings.kafka_bootstrap_servers, TopicNames(settings.topic_prefix).turn_decisions
                    ) as reader:
                        live = Live(settings, procs, Gateway(settings, reader), pool)
                        try:
                            yield live
                        except BaseException:
                            print(live.logs())
                            raise
                finally:
                    await pool.close()
                for proc in procs:
                    assert proc.terminate() == 0, proc.log()[-3000:]
        finally:
            await delete_topics(settings)  # after the workers stopped


@pytest.fixture(scope="module")
async def live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """One worker with the packaged policy, shared by a module's tests (each uses its own ids)."""
    async with live_deployment(endpoints, template_database, tmp_path_factory.mktemp("live")) as deployment:
        yield deployment
