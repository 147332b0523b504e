"""What a rebuild reads of Kafka: the input partitions and the offset range to apply, how far
behind the workers are, the decisions `turn-decisions` recorded (into a temporary table) and the
alerts `quota-alerts` recorded (stored as recorded). No consumer group: partitions are assigned
by hand and no offset is ever committed."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from minichat.domain.ids import alert_event_id
from minichat.domain.quota import BucketKey
from minichat.kafka_security import kafka_client_options
from minichat.models.events import QuotaThresholdCrossed
from minichat.settings import Settings
from minichat.storage.alerts import AlertRow, alert_row, insert_alerts
from minichat.storage.recorded import insert_recorded
from minichat.tools.kafka import committed_offset, partitions_of

logger = logging.getLogger("minichat.replay")  # the command's name, as before the move


class RebuildSetupError(RuntimeError):
    """Something the operator must fix first (schema, topics); the message names the command."""


def parse_time(text: str) -> datetime:
    """RFC 3339 with an offset (`2025-01-31T12:00:00Z`); a time without an offset is refused."""
    value = datetime.fromisoformat(text.strip().upper())
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: write it as RFC 3339, e.g. 2025-01-31T12:00:00Z")
    return value


async def input_partitions(admin: Any, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of `topics`, in topic then partition order; all must exist."""
    found = await partitions_of(admin, topics)
    missing = [topic for topic in topics if topic not in found]
    if missing:
        raise RebuildSetupError(f"topics missing: {', '.join(missing)}: run `minichat topics create`")
    return [tp for topic in topics for tp in found[topic]]


async def offset_ranges(
    consumer: Any, partitions: Sequence[TopicPartition], from_time: datetime | None
) -> dict[TopicPartition, tuple[int, int]]:
    """[start, end) of each partition: end offsets as of now, start at the beginning or at the
    first record whose timestamp is at or after `from_time`."""
    begin = await consumer.beginning_offsets(list(partitions))
    end = await consumer.end_offsets(list(partitions))
    start = dict(begin)
    if from_time is not None:
        ms = round(from_time.timestamp() * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, ms))
        for tp in partitions:
            hit = found.get(tp)
            start[tp] = max(begin[tp], hit.offset) if hit is not None else end[tp]
    return {tp: (start[tp], end[tp]) for tp in partitions}


async def workers_behind(admin: Any, group_id: str, ranges: Mapping[TopicPartition, tuple[int, int]]) -> int:
    """Records of the range the workers' group has not committed yet (0 when it cannot tell)."""
    try:
        committed = await admin.list_consumer_group_offsets(group_id, partitions=list(ranges))
    except Exception as exc:  # informational only: a rebuild does not need the group
        logger.debug("could not read the offsets of group %s: %r", group_id, exc)
        return 0
    return sum(
        max(0, end - max(start, committed_offset(committed, tp))) for tp, (start, end) in ranges.items()
    )


async def read_recorded_decisions(
    con: asyncpg.Connection, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
) -> tuple[int, set[int]]:
    """Every `turn.decision` up to the end offsets taken now, into the temporary table; returns
    how many, and the policy versions they were made under."""
    read = 0
    versions: set[int] = set()
    async for records in _to_end(consumer, partitions):
        rows = []
        for record in records:
            row = decision_row(record.value) if record.value is not None else None
            if row is not None:
                rows.append(row)
                if isinstance(row[4].get("policy_version"), int):
                    versions.add(row[4]["policy_version"])
        await insert_recorded(con, rows)
        read += len(rows)
    return read, versions


@dataclass
class RecordedAlerts:
    read: int = 0
    """Valid `quota.threshold_crossed` records (re-sent copies included)."""
    stored: int = 0
    """Alerts the database did not hold yet, stored as recorded."""
    ignored: int = 0
    """Records that are not a valid alert of the tenant they are keyed by."""


async def read_recorded_alerts(
    con: asyncpg.Connection, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
) -> RecordedAlerts:
    """Every `quota.threshold_crossed` up to the end offsets taken now, stored as recorded (with
    its outbox row) where the database does not hold that threshold yet: the rebuild's settlements
    then find it crossed and derive only the alerts nothing recorded."""
    counts = RecordedAlerts()
    async for records in _to_end(consumer, partitions):
        rows: dict[tuple[Any, ...], AlertRow] = {}
        for record in records:
            event = recorded_alert(record.key, record.value)
            if event is None:
                counts.ignored += 1
                continue
            counts.read += 1
            row = alert_row(event)
            rows.setdefault(row[:6], row)  # the first copy wins (re-sent copies are equal)
        counts.stored += await insert_alerts(con, list(rows.values()))
    return counts


def recorded_alert(key: bytes | None, value: bytes | None) -> QuotaThresholdCrossed | None:
    """The alert a `quota-alerts` record holds: a valid event, keyed by its tenant, with the
    contract's id; None for anything else (never logged: it may hold anything)."""
    try:
        event = QuotaThresholdCrossed.model_validate_json(value or b"")
    except ValidationError:
        return None
    window = BucketKey(event.period_type, event.period_start, event.bucket)
    if key != str(event.tenant_id).encode() or event.event_id != alert_event_id(
        event.tenant_id, event.user_id, window, event.threshold_percent
    ):
        return None
    return event


async def _to_end(
    consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """`partitions` from their beginning up to the end offsets taken now, fetch by fetch."""
    ends = await consumer.end_offsets(list(partitions))
    starts = await consumer.beginning_offsets(list(partitions))
    todo = {tp for tp in partitions if starts[tp] < ends[tp]}
    consumer.assign(sorted(todo, key=lambda tp: tp.partition))
    for tp in todo:
        consumer.seek(tp, starts[tp])
    while todo:
        fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=5000)
        yield [record for tp, records in fetched.items() for record in records if record.offset < ends[tp]]
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)


@contextlib.asynccontextmanager
async def group_free_consumer(settings: Settings, purpose: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        **kafka_client_options(settings),
        group_id=None,  # no group: nothing is ever committed, the workers' group is untouched
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=f"minichat-replay-{purpose}",
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def decision_row(value: bytes) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID, bool, dict[str, Any]] | None:
    """(tenant, chat, command id, replay, payload) of a turn-creating command's decision."""
    try:
        payload = json.loads(value)
        command = payload["command"]
        if command not in ("turn.requested", "turn.retry", "turn.edit") or payload.get("request_id") is None:
            return None
        replayed = bool(payload.pop("replay", False))
        return (
            uuid.UUID(payload["tenant_id"]),
            uuid.UUID(payload["chat_id"]),
            uuid.UUID(payload["request_id"]),
            replayed,
            payload,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("a record of turn-decisions is not a decision; ignored")
        return None
