"""Test helpers for the real broker and database: isolated topics and databases, waiting on conditions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from minichat.settings import Settings
from minichat.storage.digest import Digest, digest

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


async def end_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    """The end offset of every partition of `topics`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in range(settings.partitions)]
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def db_digest(url: str) -> Digest:
    """The digest of the database at `url` (what live and rebuilt books are compared by)."""
    con = await asyncpg.connect(url)
    try:
        return await digest(con)
    finally:
        await con.close()


class DeadlineExceeded(AssertionError):
    pass


async def wait_until(
    condition: Callable[[], Awaitable[T | None]], *, timeout: float = 30.0, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    poll = 0.02
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)
        poll = min(poll * 2, 0.25)


def database_url_for(base_url: str, dbname: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@asynccontextmanager
async def scratch_database(admin_url: str, tag: str, *, template: str | None = None) -> AsyncIterator[str]:
    """A database of its own (a copy of `template`, else empty), dropped afterwards; yields its URL."""
    import asyncpg

    from minichat.storage.bench import drop_database

    name = f"minichat_{tag}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{copy}')
        yield database_url_for(admin_url, name)
    finally:
        try:
            # plain DROP first: it cancels an autovacuum worker, which FORCE may not signal
            await drop_database(admin, name)
        finally:
            await admin.close()


@dataclass(frozen=True)
class Endpoints:
    kafka: str
    database_url: str
    """The admin login (owns the schema): creates, migrates and drops the tests' databases, and
    the tests' own reads and writes use it."""
    runtime_url: str | None = None
    """The worker's own login (owns nothing), when the stack has one: worker processes use it."""


_runtime_login: list[tuple[str, str]] = []
"""(user, password) of the runtime login of the session's endpoints, once known."""


def use_runtime_login(runtime_url: str | None) -> None:
    """Worker processes of this test session connect with `runtime_url`'s login (None: the admin's)."""
    _runtime_login.clear()
    if runtime_url:
        parts = urlsplit(runtime_url)
        _runtime_login.append((parts.username or "", parts.password or ""))


def as_runtime(database_url: str) -> str:
    """`database_url`'s database with the runtime login, when one is known (else unchanged)."""
    if not _runtime_login:
        return database_url
    user, password = _runtime_login[0]
    parts = urlsplit(database_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> list[Any]:
    """Produce in order and wait for every ack; returns the record metadata."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key) for key, value in records]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


def produce_json(
    bootstrap: str, topic: str, events: list[Mapping[str, Any]], *, key_field: str = "chat_id"
) -> Awaitable[list[Any]]:
    return produce(bootstrap, topic, [(str(e[key_field]).encode(), json.dumps(e).encode()) for e in events])


class TopicReader:
    """Reads a whole topic from the beginning, all partitions, accumulating what it saw."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Any] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> TopicReader:
        # Without a group id, a subscription is assigned every partition of the topic.
        self._consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll(self) -> list[Any]:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=200)
        for tp in sorted(batches, key=lambda t: t.partition):
            self.records.extend(batches[tp])
        return self.records

    def values(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.records]

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], *, timeout: float = 30.0, what: str = ""
    ) -> list[dict[str, Any]]:
        async def check() -> list[dict[str, Any]] | None:
            await self.poll()
            values = self.values()
            return values if predicate(values) else None

        return await wait_until(check, timeout=timeout, what=what or f"records on {self.topic}")


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker ignored SIGTERM for {timeout}s:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`minichat <args>` as a user runs it, with `env` (plus the test run's own PATH and the like)."""
    return subprocess.run(
        [sys.executable, "-m", "minichat.cli", *args],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    merged = {k: v for k, v in os.environ.items() if not k.startswith("MINICHAT_")}
    merged.update(env)
    return merged


@contextmanager
def run_worker(env: Mapping[str, str], log_path: Path, *args: str) -> Iterator[WorkerProcess]:
    """`minichat worker` as a real subprocess (faust owns its loop and signals)."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minichat.cli", "worker", *args],
            env=worker_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    worker = WorkerProcess(proc, log_path)
    try:
        yield worker
    finally:
        worker.kill()


MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_metrics(port: int) -> MetricSamples | None:
    """A worker's `/metrics`, read with prometheus_client's own parser: value by (sample name,
    sorted labels); None while its web server does not answer."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
    except aiohttp.ClientError:
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
