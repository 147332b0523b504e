"""Producers must not choose event time (issue 10, item 2; docs/contract.md, "Topic settings"
and "Dead-letter codes").

Event time is the record timestamp, and only the broker's `LogAppendTime` is one a gateway cannot
forge. On a topic set to `CreateTime` a producer could backdate a request into an empty quota
period; the worker refuses to start on such input topics, and dead-letters (`timestamp_type`)
any record that carries a producer's timestamp anyway (a topic changed while it runs).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from minichat.models.topics import TOPIC_CONFIG, TopicNames
from minichat.processors.topics import create_topics, topic_problems
from tests.conftest import Deployment, Live, deployment_settings, live_deployment
from tests.support import Endpoints, TopicReader, run_cli, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FORTY_DAYS_MS = 40 * 86_400_000


async def _set_timestamp_type(bootstrap: str, topics: list[str], value: str) -> None:
    """Set it, and wait until the broker applies it: the controller accepts the change before the
    broker replays it, so a record produced at once could still get the old timestamp type."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        configs = {**TOPIC_CONFIG, "message.timestamp.type": value}
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, configs=configs) for t in topics]
        )

        async def applied() -> bool:
            resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
            found = [
                dict((entry[0], entry[1]) for entry in entries)
                for response in await admin.describe_configs(resources)
                for _error, _msg, _type, _name, entries in response.resources
            ]
            return len(found) == len(topics) and all(f.get("message.timestamp.type") == value for f in found)

        await wait_until(applied, timeout=30, what=f"message.timestamp.type={value} applied")
    finally:
        await admin.close()


async def test_the_worker_refuses_input_topics_where_producers_set_the_time(
    endpoints: Endpoints, database_url: str
) -> None:
    settings = deployment_settings(endpoints, database_url)
    names = TopicNames(settings.topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=endpoints.kafka)
    await admin.start()
    try:  # created by hand, as the broker's defaults (or an auto-create) would have them
        await admin.create_topics([NewTopic(n, settings.partitions, 1) for n in names.all()])
    finally:
        await admin.close()

    result = run_cli(Deployment(settings).env(), "worker")
    assert result.returncode == 2, result.stderr
    for topic in names.inputs():
        assert topic in result.stderr
    assert "not LogAppendTime" in result.stderr and "run `minichat topics create`" in result.stderr

    report = await create_topics(settings)
    assert set(names.inputs()) <= set(report.reconfigured)
    assert await topic_problems(settings) == []


async def backdated_request(live: Live, topic: str) -> dict[str, object]:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    event = live.gateway.requested(tenant, user, chat)
    producer = AIOKafkaProducer(bootstrap_servers=live.settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        backdated = int(time.time() * 1000) - FORTY_DAYS_MS
        await producer.send_and_wait(
            topic, json.dumps(event).encode(), key=str(chat).encode(), timestamp_ms=backdated
        )
    finally:
        await producer.stop()
    return event


async def test_a_record_with_a_producer_timestamp_is_dead_lettered(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with live_deployment(endpoints, template_database, tmp_path) as live:
        names = TopicNames(live.settings.topic_prefix)
        gw = live.gateway
        [first] = await gw.decide(gw.requested(uuid.uuid4(), uuid.uuid4(), uuid.uuid4()))
        assert first["decision"] == "allow"

        # Someone turns the topic to CreateTime while the worker runs, and backdates a request.
        await _set_timestamp_type(endpoints.kafka, [names.turn_requests], "CreateTime")
        async with TopicReader(endpoints.kafka, names.dead_letters) as letters:
            event = await backdated_request(live, names.turn_requests)
            [letter] = await letters.wait_for(lambda vs: len(vs) >= 1, timeout=60, what="a dead letter")
        assert letter["error_code"] == "timestamp_type"
        assert "LogAppendTime" in letter["error_detail"]
        assert json.loads(letter["payload"])["event_id"] == event["event_id"]
        stored = await live.db.fetchval(
            "SELECT count(*) FROM chat_turns WHERE chat_id = $1", event["chat_id"]
        )
        quota = await live.db.fetchval(
            "SELECT count(*) FROM quota_usage WHERE user_id = $1", event["user_id"]
        )
        assert (stored, quota) == (0, 0), "nothing of the backdated request is stored"

        await _set_timestamp_type(endpoints.kafka, [names.turn_requests], "LogAppendTime")
        [after] = await gw.decide(gw.requested(uuid.uuid4(), uuid.uuid4(), uuid.uuid4()))
        assert after["decision"] == "allow"
        assert all(w.proc.poll() is None for w in live.workers)
