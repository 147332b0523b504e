"""A gateway on librdkafka's default partitioner (CRC32, `consistent_random`) puts a chat on
another partition than murmur2, where minichat's decisions and the watchdog's events for it go
(issue 24; docs/contract.md, "Dead-letter codes"): such a record is dead-lettered
`wrong_partition` and changes nothing, live and in a rebuild; a correctly placed one is decided."""

from __future__ import annotations

import json
import uuid
import zlib
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from minichat.models.topics import TopicNames
from minichat.partitioning import KeyedPartitioner
from minichat.tools.rebuild import run_rebuild
from tests.conftest import live_deployment
from tests.support import Endpoints, TopicReader, db_digest

pytestmark = pytest.mark.integration


def crc32_misplaced_chat(partitions: int) -> tuple[uuid.UUID, int, int]:
    """A chat id whose CRC32 partition differs from its murmur2 one: (chat, crc32's, murmur2's)."""
    murmur = KeyedPartitioner()
    while True:
        chat = uuid.uuid4()
        key = str(chat).encode()
        crc, right = zlib.crc32(key) % partitions, murmur(key, list(range(partitions)), [])
        if crc != right:
            return chat, crc, right


async def test_a_record_on_crc32s_partition_is_dead_lettered_wrong_partition(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with live_deployment(endpoints, template_database, tmp_path) as live:
        names = TopicNames(live.settings.topic_prefix)
        gw = live.gateway
        tenant, user = uuid.uuid4(), uuid.uuid4()
        chat, crc, right = crc32_misplaced_chat(live.settings.partitions)
        event = gw.requested(tenant, user, chat)
        producer = AIOKafkaProducer(bootstrap_servers=live.settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            async with TopicReader(endpoints.kafka, names.dead_letters) as letters:
                sent = await producer.send_and_wait(
                    names.turn_requests, json.dumps(event).encode(), key=str(chat).encode(), partition=crc
                )
                assert sent.partition == crc
                [letter] = await letters.wait_for(lambda vs: len(vs) >= 1, timeout=60, what="a dead letter")
        finally:
            await producer.stop()
        assert letter["error_code"] == "wrong_partition"
        assert f"partition {crc}, its key's is {right}" in letter["error_detail"]
        assert "murmur2_random" in letter["error_detail"]
        assert json.loads(letter["payload"])["event_id"] == event["event_id"]
        stored = await live.db.fetchval("SELECT count(*) FROM chat_turns WHERE chat_id = $1", chat)
        quota = await live.db.fetchval("SELECT count(*) FROM quota_usage WHERE user_id = $1", user)
        assert (stored, quota) == (0, 0), "nothing of the misplaced request is stored"

        # The same chat from a correctly configured producer (murmur2) is decided, and only it.
        [decision] = await gw.decide(gw.requested(tenant, user, chat))
        assert decision["decision"] == "allow"
        assert decision["command_event_id"] != event["event_id"]
        decided = await live.db.fetchval("SELECT count(*) FROM chat_turns WHERE chat_id = $1", chat)
        assert decided == 1
        assert all(w.proc.poll() is None for w in live.workers)

        # A rebuild applies the same rule: the misplaced record is dead-lettered again, not applied.
        before = await db_digest(live.settings.database_url)
        summary = await run_rebuild(live.settings, show_progress=False)
        assert summary.dead_lettered == 1
        assert await db_digest(live.settings.database_url) == before
