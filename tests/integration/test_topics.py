"""`minichat topics create` against a real broker: the contract's topics, idempotently."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from minichat.bench.scratch import delete_topics
from minichat.models.topics import TopicNames
from minichat.processors.topics import TopicError, create_topics, topic_problems
from tests.conftest import deployment_settings
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration


async def _configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
        return {
            name: {entry[0]: entry[1] for entry in entries}
            for response in responses
            for _code, _msg, _type, name, entries in response.resources
        }
    finally:
        await admin.close()


async def test_topics_are_created_once_with_contract_settings(endpoints: Endpoints) -> None:
    settings = deployment_settings(endpoints, "postgresql://unused/unused", partitions=3)
    names = TopicNames(settings.topic_prefix).all()
    [problem] = await topic_problems(settings)
    assert problem == f"topics missing: {', '.join(names)}: run `minichat topics create`"

    first = await create_topics(settings)
    second = await create_topics(settings)

    assert first.created == names and first.existing == []
    assert second.created == [] and second.existing == names and second.reconfigured == []
    assert await topic_problems(settings) == []
    configs = await _configs(endpoints.kafka, names)
    for name in names:
        assert configs[name]["message.timestamp.type"] == "LogAppendTime", name
        assert configs[name]["retention.ms"] == "-1", name
        compacted = name == TopicNames(settings.topic_prefix).policy_versions
        assert configs[name]["cleanup.policy"] == ("compact" if compacted else "delete"), name


async def test_wrong_partition_count_is_reported(endpoints: Endpoints) -> None:
    settings = deployment_settings(endpoints, "postgresql://unused/unused", partitions=2)
    await create_topics(settings)
    other = settings.model_copy(update={"partitions": 3})
    with pytest.raises(TopicError, match="has 2 partitions, the deployment expects 3"):
        await create_topics(other)


async def test_a_worker_refuses_to_start_without_policy_versions(endpoints: Endpoints) -> None:
    settings = deployment_settings(endpoints, "postgresql://unused/unused", partitions=1)
    topic = TopicNames(settings.topic_prefix).policy_versions
    await create_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=endpoints.kafka)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()

    async def missing() -> list[str] | None:
        problems = await topic_problems(settings)
        return problems or None

    assert await wait_until(missing, timeout=30, what="the topic to be gone") == [
        f"topics missing: {topic}: run `minichat topics create`"
    ]
    await delete_topics(settings)


async def test_default_replication_factor_is_what_the_cluster_holds(endpoints: Endpoints) -> None:
    """On the single-broker stack the default factor is min(3, 1) = 1, `min.insync.replicas` 1;
    asking for more copies than there are brokers names the setting."""
    settings = deployment_settings(endpoints, "postgresql://unused/unused", partitions=2)
    report = await create_topics(settings)
    assert report.replication_factor == 1
    names = TopicNames(settings.topic_prefix).all()
    configs = await _configs(endpoints.kafka, names)
    assert {configs[n]["min.insync.replicas"] for n in names} == {"1"}
    with pytest.raises(TopicError, match="MINICHAT_REPLICATION_FACTOR=3 but the cluster has 1 broker"):
        await create_topics(settings.model_copy(update={"replication_factor": 3}))
