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
TIMESTAMP_TYPE = "message.timestamp.type"


class TopicError(RuntimeError):
    """A topic is missing or set up differently from the contract."""


@dataclass(frozen=True)
class TopicReport:
    created: list[str]
    existing: list[str]
    reconfigured: list[str]


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        **kafka_client_options(settings),
        client_id=f"{settings.group_id}-admin",
        request_timeout_ms=30_000,
    )


async def _partition_counts(
    admin: AIOKafkaAdminClient, names: list[str], *, timeout_s: float = 30.0
) -> dict[str, int]:
    """Partition counts, waiting for new topics' metadata to reach the broker we ask."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        counts = {
            topic["topic"]: len(topic["partitions"])
            for topic in await admin.describe_topics(names)
            if topic["error_code"] == 0 and topic["partitions"]
        }
        if len(counts) == len(names) or loop.time() > deadline:
            return counts
        await asyncio.sleep(0.1)


async def _config_drift(
    admin: AIOKafkaAdminClient, topics: TopicNames, names: list[str]
) -> dict[str, dict[str, str]]:
    """Per topic, the contract settings whose current value differs."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    drift: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for error_code, _msg, _type, name, entries in response.resources:
            if error_code:
                raise TopicError(f"cannot read the configuration of {name}: error {error_code}")
            current = {entry[0]: entry[1] for entry in entries}
            wrong = {k: v for k, v in topics.config(name).items() if current.get(k) != v}
            if wrong:
                drift[name] = wrong
    return drift


async def create_topics(settings: Settings, *, replication_factor: int = 1) -> TopicReport:
    """Create the contract's topics; existing ones are checked and their settings brought in line."""
    topics = TopicNames(settings.topic_prefix)
    names = topics.all()
    admin = _admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics()) & set(names)
        missing = [n for n in names if n not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(n, settings.partitions, replication_factor, topic_configs=topics.config(n))
                    for n in missing
                ]
            )
            for topic, code, *rest in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise TopicError(f"creating {topic} failed: error {code} {rest[0] if rest else ''}")
                if code == 0:
                    created.append(topic)
        counts = await _partition_counts(admin, names)
        for name in names:
            if counts.get(name) != settings.partitions:
                raise TopicError(
                    f"{name} has {counts.get(name)} partitions, the deployment expects "
                    f"{settings.partitions}: partitions decide which worker owns a chat, "
                    "so fix the topic or MINICHAT_PARTITIONS"
                )
        drift = await _config_drift(admin, topics, names)
        if drift:
            await admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, name, configs=topics.config(name))
                    for name in drift
                ]
            )
        return TopicReport(
            created=created,
            existing=[n for n in names if n in existing],
            reconfigured=sorted(drift),
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
        drift = await _config_drift(admin, names, inputs) if inputs else {}
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
