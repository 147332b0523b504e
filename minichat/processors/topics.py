"""Creating and checking the contract's topics with the Kafka admin API."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from minichat.kafka_security import kafka_client_options
from minichat.models.topics import TopicNames
from minichat.settings import Settings

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3
TIMESTAMP_TYPE = "message.timestamp.type"


class TopicError(RuntimeError):
    """A topic is missing or set up differently from the contract."""


MIN_INSYNC = "min.insync.replicas"
DEFAULT_MAX_REPLICATION = 3


@dataclass(frozen=True)
class TopicReport:
    created: list[str]
    existing: list[str]
    reconfigured: list[str]
    replication_factor: int = 1
    """The factor the topics were made (or checked) with."""


def min_insync(replication_factor: int) -> int:
    """`min.insync.replicas` for a factor: all but one copy (so one broker may be down while
    producers with `acks=all` go on), at least 1."""
    return max(1, replication_factor - 1)


def topic_settings(topics: TopicNames, name: str, replication_factor: int) -> dict[str, str]:
    """The settings topic `name` (full name) carries, at this replication factor."""
    return {**topics.config(name), MIN_INSYNC: str(min_insync(replication_factor))}


async def _replication_factor(admin: AIOKafkaAdminClient, settings: Settings) -> int:
    """`MINICHAT_REPLICATION_FACTOR`, else min(3, brokers in the cluster's metadata); never more
    than there are brokers (the broker's own refusal would not say which setting to change)."""
    brokers = len((await admin.describe_cluster())["brokers"])
    wanted = settings.replication_factor
    if wanted is None:
        return max(1, min(DEFAULT_MAX_REPLICATION, brokers))
    if wanted > brokers:
        raise TopicError(
            f"MINICHAT_REPLICATION_FACTOR={wanted} but the cluster has {brokers} broker(s): "
            "lower the setting or add brokers"
        )
    return wanted


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        **kafka_client_options(settings),
        client_id=f"{settings.group_id}-admin",
        request_timeout_ms=30_000,
    )


@dataclass(frozen=True)
class _Layout:
    partitions: int
    replicas: int
    """The smallest replica count of the topic's partitions."""


async def _layouts(
    admin: AIOKafkaAdminClient, names: list[str], *, timeout_s: float = 30.0
) -> dict[str, _Layout]:
    """Partition and replica counts, waiting for new topics' metadata to reach the broker we ask."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        layouts = {
            topic["topic"]: _Layout(
                len(topic["partitions"]), min(len(p["replicas"]) for p in topic["partitions"])
            )
            for topic in await admin.describe_topics(names)
            if topic["error_code"] == 0 and topic["partitions"]
        }
        if len(layouts) == len(names) or loop.time() > deadline:
            return layouts
        await asyncio.sleep(0.1)


async def _config_drift(
    admin: AIOKafkaAdminClient,
    wanted: dict[str, dict[str, str]],
    *,
    timeout_s: float = 30.0,
) -> dict[str, dict[str, str]]:
    """Per topic of `wanted` (full name to settings), the settings whose current value differs. On
    a cluster the broker asked may not know a topic just made yet (UNKNOWN_TOPIC_OR_PARTITION):
    asked again until `timeout_s`."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in wanted]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        drift: dict[str, dict[str, str]] = {}
        unknown = False
        for response in await admin.describe_configs(resources):
            for error_code, _msg, _type, name, entries in response.resources:
                if error_code == _UNKNOWN_TOPIC and loop.time() < deadline:
                    unknown = True
                    continue
                if error_code:
                    raise TopicError(f"cannot read the configuration of {name}: error {error_code}")
                current = {entry[0]: entry[1] for entry in entries}
                wrong = {k: v for k, v in wanted[name].items() if current.get(k) != v}
                if wrong:
                    drift[name] = wrong
        if not unknown:
            return drift
        await asyncio.sleep(0.1)


async def create_topics(settings: Settings) -> TopicReport:
    """Create the contract's topics at the replication factor of `_replication_factor`, with
    `min.insync.replicas` = factor - 1; existing ones are checked (partitions, replication factor)
    and their settings brought in line."""
    topics = TopicNames(settings.topic_prefix)
    names = topics.all()
    admin = _admin(settings)
    await admin.start()
    try:
        factor = await _replication_factor(admin, settings)
        wanted = {n: topic_settings(topics, n, factor) for n in names}
        existing = set(await admin.list_topics()) & set(names)
        missing = [n for n in names if n not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [NewTopic(n, settings.partitions, factor, topic_configs=wanted[n]) for n in missing]
            )
            for topic, code, *rest in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise TopicError(f"creating {topic} failed: error {code} {rest[0] if rest else ''}")
                if code == 0:
                    created.append(topic)
        layouts = await _layouts(admin, names)
        for name in names:
            partitions = layouts[name].partitions if name in layouts else None
            if partitions != settings.partitions:
                raise TopicError(
                    f"{name} has {partitions} partitions, the deployment expects "
                    f"{settings.partitions}: partitions decide which worker owns a chat, "
                    "so fix the topic or MINICHAT_PARTITIONS"
                )
        # Changing an existing topic's factor moves data (kafka-reassign-partitions): an operator's
        # decision, not this command's. Its min.insync.replicas follows the factor it has.
        short = {n: layouts[n].replicas for n in names if layouts[n].replicas != factor}
        if short:
            raise TopicError(
                "replication factor differs from the wanted "
                f"{factor} (MINICHAT_REPLICATION_FACTOR, default min(3, brokers)): "
                + ", ".join(f"{n} has {r}" for n, r in short.items())
                + ": reassign the topics' partitions (kafka-reassign-partitions), or set "
                "MINICHAT_REPLICATION_FACTOR to the factor they have"
            )
        drift = await _config_drift(admin, {n: wanted[n] for n in names})
        if drift:
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name, configs=wanted[name]) for name in drift]
            )
        return TopicReport(
            created=created,
            existing=[n for n in names if n in existing],
            reconfigured=sorted(drift),
            replication_factor=factor,
        )
    finally:
        await admin.close()


async def topic_problems(settings: Settings) -> list[str]:
    """Why the worker must not start on these topics, each naming its fix: topics missing, or an
    input topic whose records carry the producer's timestamp (a producer could then backdate a
    request into an empty quota period: event time must be the broker's append time)."""
    names = TopicNames(settings.topic_prefix)
    admin = _admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names.all() if n not in existing]
        inputs = [n for n in names.inputs() if n in existing]
        drift = await _config_drift(admin, {n: names.config(n) for n in inputs}) if inputs else {}
    finally:
        await admin.close()
    problems = []
    if missing:
        problems.append(f"topics missing: {', '.join(missing)}: run `minichat topics create`")
    producer_time = sorted(name for name, wrong in drift.items() if TIMESTAMP_TYPE in wrong)
    if producer_time:
        problems.append(
            f"{', '.join(producer_time)}: {TIMESTAMP_TYPE} is not LogAppendTime, so producers would "
            "choose event time: run `minichat topics create`, which sets it"
        )
    return problems
