"""What a handler sees of a Kafka record, independent of faust."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: datetime  # the record timestamp (LogAppendTime): the event time
    timestamp_type: int = 1
    """Kafka's timestamp type: 1 LogAppendTime (the broker's), 0 CreateTime (the producer's)."""

    @property
    def timestamp_ms(self) -> int:
        return round(self.timestamp.timestamp() * 1000)


LOG_APPEND_TIME = 1


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_from_ms(ms: int) -> datetime:
    """Exact (integer milliseconds), and half the cost of `fromtimestamp(...).replace(...)`."""
    return _EPOCH + timedelta(milliseconds=ms)


def source_record(record: Any) -> SourceRecord:
    """An aiokafka `ConsumerRecord` (timestamp in milliseconds)."""
    value = record.value
    return SourceRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=value if isinstance(value, bytes) else bytes(value or b""),
        timestamp=timestamp_from_ms(record.timestamp),
        timestamp_type=record.timestamp_type,
    )


@dataclass(frozen=True, slots=True)
class Output:
    """A record to produce after the batch's transaction committed."""

    topic: str
    key: bytes | None
    value: bytes
