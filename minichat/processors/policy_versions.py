"""Policy versions are facts: before its first decision a worker writes the version it decides
with to `policy-versions` and waits for the acknowledgement, so a rebuild can apply every recorded
decision under its own version, even into an empty database."""

from __future__ import annotations

import logging

from minichat.models.events import PolicyVersion
from minichat.models.policy import Policy
from minichat.models.topics import TopicNames
from minichat.processors.clients import output_producer
from minichat.settings import Settings

logger = logging.getLogger(__name__)


def policy_version_record(policy: Policy) -> tuple[bytes, bytes]:
    """(key, value) of the version's record: key = the version, value = `policy.version` JSON."""
    return str(policy.version).encode(), PolicyVersion.of(policy).model_dump_json().encode()


async def publish_policy_version(settings: Settings, policy: Policy) -> None:
    """Write `policy` to `policy-versions` (acks=all, idempotent) and wait for the acknowledgement.
    A copy per worker start: compaction keeps one per version."""
    topic = TopicNames(settings.topic_prefix).policy_versions
    key, value = policy_version_record(policy)
    producer = output_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    logger.info("policy version %d recorded on %s", policy.version, topic)
