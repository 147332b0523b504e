"""Throwaway deployments: a scratch database (migrated or empty), fresh topics, a bench policy.

Everything created here is removed on the way out (databases dropped, topics deleted), also when
the run fails. Consumer groups cannot be deleted with aiokafka's admin client; an empty group
holds no data and expires with the broker's offset retention.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from minichat.bench.progress import say
from minichat.kafka_security import kafka_client_options
from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.settings import PACKAGED_POLICY, Settings
from minichat.storage.bench import create_database, drop_database
from minichat.storage.schema import migrate

BENCH_POLICY_VERSION = 8_000
"""The bench's policy version: the packaged policy with limits no bench traffic can reach."""

BIG_LIMIT_MICRO = 10**15
"""A billion credits per user and period: quota never refuses a bench request."""


def database_url_for(base_url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(base_url)._replace(path=f"/{dbname}"))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def runtime_url_for(base: Settings, scratch_url: str) -> str:
    """The scratch database `scratch_url` (made with the admin login) as `base`'s own login: the
    bench's workers run with the privileges the worker has in production."""
    return database_url_for(base.database_url, urlsplit(scratch_url).path.lstrip("/"))


@asynccontextmanager
async def scratch_database(admin_url: str, tag: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A new database next to `admin_url`'s (migrated with the project's migrations unless told
    otherwise), dropped afterwards; yields its URL (the admin login's)."""
    name = f"minichat_bench_{tag}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await create_database(admin, name)
        say(f"scratch database {name}")
        url = database_url_for(admin_url, name)
        if migrated:
            con = await asyncpg.connect(url)
            try:
                await migrate(con)
            finally:
                await con.close()
        yield url
    finally:
        try:
            await drop_database(admin, name)
        finally:
            await admin.close()


def write_bench_policy(directory: Path) -> Path:
    """The packaged policy with its own version and limits far above any bench traffic."""
    policy: dict[str, Any] = yaml.safe_load(PACKAGED_POLICY.read_text())
    policy["version"] = BENCH_POLICY_VERSION
    big = {"daily": BIG_LIMIT_MICRO, "monthly": BIG_LIMIT_MICRO}
    policy["limits"] = {"standard": dict(big), "premium": dict(big)}
    policy["tenants"] = {}
    tools = dict(policy.get("tools") or {})
    tools.update(web_search_daily_quota=10**6, code_interpreter_daily_quota=10**6)
    policy["tools"] = tools
    path = directory / f"bench-policy-{BENCH_POLICY_VERSION}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


async def delete_topics(settings: Settings) -> None:
    """Delete every topic of the deployment's prefix (the contract's six and faust's own, e.g.
    `<group>-__assignor-__leader`); a failure is reported, not raised (it must not hide the error
    that ended the run)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    try:
        await admin.start()
        try:
            topics = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
            await admin.delete_topics(topics)
        finally:
            await admin.close()
    except (KafkaError, OSError) as exc:
        say(f"could not delete the topics {settings.topic_prefix}*: {type(exc).__name__}")


async def wait_for_leaders(settings: Settings, within: float = 30.0) -> None:
    """Poll until every partition of the deployment's topics has a leader (a new topic's first
    produce would otherwise be refused and retried)."""
    names = TopicNames(settings.topic_prefix).all()
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        deadline = time.monotonic() + within
        while True:
            described = await admin.describe_topics(names)
            led = [
                t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ]
            if len(led) == len(names) and all(led):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {settings.topic_prefix}* have no leaders after {within:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


@asynccontextmanager
async def deployment(base: Settings, tag: str, policy_file: Path) -> AsyncIterator[Settings]:
    """A fresh topic prefix (topics created), consumer group and migrated database; yields the
    settings of that deployment (everything else as in `base`)."""
    prefix = f"bench{uuid.uuid4().hex[:8]}.{tag}."
    say(f"scratch topics {prefix}*")
    async with scratch_database(base.admin_url, tag) as url:
        settings = base.model_copy(
            update={
                "database_url": runtime_url_for(base, url),
                "admin_database_url": url,
                "topic_prefix": prefix,
                "group_id": f"{prefix}workers",
                "policy_file": policy_file,
            }
        )
        try:
            await create_topics(settings)
            await wait_for_leaders(settings)
            yield settings
        finally:
            await delete_topics(settings)
