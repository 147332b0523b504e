"""`wrong_partition`: a decoded input record on another partition than murmur2(key) mod the
topic's partition count is dead-lettered; the worker and a rebuild share the rule (`decode`)."""

from __future__ import annotations

import json
import uuid
import zlib
from datetime import UTC, datetime

from minichat.models.topics import TopicNames
from minichat.partitioning import KeyedPartitioner
from minichat.processors.batches import MergedBatches, Placement
from minichat.processors.pipeline import Decoded
from minichat.processors.records import Output, SourceRecord

NAMES = TopicNames("t.")
PARTITIONS = 8


def chat_on_another_crc32_partition() -> uuid.UUID:
    """A chat id whose CRC32 partition (librdkafka's default) is not its murmur2 one."""
    murmur = KeyedPartitioner()
    while True:
        chat = uuid.uuid4()
        key = str(chat).encode()
        if zlib.crc32(key) % PARTITIONS != murmur(key, list(range(PARTITIONS)), []):
            return chat


def record(chat: uuid.UUID, partition: int) -> SourceRecord:
    event = {
        "type": "turn.requested",
        "event_id": str(uuid.uuid4()),
        "schema_version": 1,
        "occurred_at": "2026-03-01T12:00:00Z",
        "tenant_id": str(uuid.uuid4()),
        "chat_id": str(chat),
        "user_id": str(uuid.uuid4()),
        "request_id": str(uuid.uuid4()),
        "content": "hello",
        "model": "gpt-5-mini",
    }
    value = json.dumps(event).encode()
    return SourceRecord(NAMES.turn_requests, partition, 0, str(chat).encode(), value, datetime.now(UTC))


def batches() -> MergedBatches:
    async def unused(*_: object) -> list[Output]:
        raise AssertionError

    made = MergedBatches(topics=NAMES, turn_requests=unused, turn_events=unused)
    made.placement.partitions[NAMES.turn_requests] = PARTITIONS
    return made


def test_a_record_on_its_murmur2_partition_is_decoded_one_on_crc32s_is_dead_lettered() -> None:
    chat = chat_on_another_crc32_partition()
    key = str(chat).encode()
    right = KeyedPartitioner()(key, list(range(PARTITIONS)), [])
    wrong = zlib.crc32(key) % PARTITIONS
    merged = batches()
    placed, misplaced = merged.decode([record(chat, right), record(chat, wrong)])
    assert isinstance(placed, Decoded)
    assert isinstance(misplaced, Output)
    assert misplaced.topic == NAMES.dead_letters
    letter = json.loads(misplaced.value)
    assert letter["error_code"] == "wrong_partition"
    assert f"partition {wrong}, its key's is {right}" in letter["error_detail"]
    assert "murmur2_random" in letter["error_detail"]
    assert "hello" not in letter["error_detail"]
    assert (
        merged.metrics.value("minichat_dead_letters_total", topic="turn_requests", code="wrong_partition")
        == 1
    )


def test_a_bad_record_keeps_its_own_code_and_an_unknown_topic_is_not_checked() -> None:
    chat = chat_on_another_crc32_partition()
    wrong = zlib.crc32(str(chat).encode()) % PARTITIONS
    bad = record(chat, wrong)
    bad = SourceRecord(bad.topic, bad.partition, 0, b"not-the-chat", bad.value, bad.timestamp)
    (out,) = batches().decode([bad])
    assert isinstance(out, Output)
    assert json.loads(out.value)["error_code"] == "key_mismatch"
    unchecked = MergedBatches(
        topics=NAMES, turn_requests=batches().turn_requests, turn_events=batches().turn_events
    )
    assert isinstance(unchecked.decode([record(chat, wrong)])[0], Decoded)


def test_the_hash_cache_is_bounded() -> None:
    placement = Placement(max_keys=3)
    placement.partitions[NAMES.turn_requests] = PARTITIONS
    for _ in range(10):
        chat = uuid.uuid4()
        key = str(chat).encode()
        right = KeyedPartitioner()(key, list(range(PARTITIONS)), [])
        assert placement.misplaced(record(chat, right)) is None
        assert placement.misplaced(record(chat, (right + 1) % PARTITIONS)) is not None
    assert len(placement._hashes) <= 3
