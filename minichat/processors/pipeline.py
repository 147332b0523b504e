"""What every input handler shares: decoded records, the handler and producer shapes, dead
letters, and sending outputs after a batch's transaction committed (never before).

A crash between commit and produce runs the batch's records again: every handler is idempotent and
a re-seen command re-sends its stored decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from aiokafka import AIOKafkaProducer

from minichat.models.events import DeadLetter, DecodeError, to_json_bytes
from minichat.processors.errors import Action, classify
from minichat.processors.records import Output, SourceRecord

logger = logging.getLogger(__name__)

E = TypeVar("E")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Decoded(Generic[E]):
    record: SourceRecord
    event: E


Handler = Callable[[asyncpg.Connection, Sequence[Decoded[E]]], Awaitable[list[Output]]]


class Producer(Protocol):
    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]: ...


def dead_letter_for(record: SourceRecord, error: DecodeError, dead_letters_topic: str) -> Output:
    letter = DeadLetter.for_record(
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        error_code=error.code,
        error_detail=error.detail,
        value=record.value,
        received_at=record.timestamp,
    )
    return Output(topic=dead_letters_topic, key=record.key, value=to_json_bytes(letter))


def refused_detail(exc: BaseException) -> str:
    """What the database refused, from the error's fields only: its message or DETAIL can quote the
    row ("Failing row contains ...") or the parameter, so neither is used."""
    fields = [type(exc).__name__]
    for label, attr in (
        ("sqlstate", "sqlstate"),
        ("table", "table_name"),
        ("column", "column_name"),
        ("constraint", "constraint_name"),
        ("type", "data_type_name"),
    ):
        value = getattr(exc, attr, None)
        if value:
            fields.append(f"{label} {value}")
    if len(fields) == 1:
        fields.append("a parameter outside its column type's range (refused before it was sent)")
    return "PostgreSQL refused the record: " + ", ".join(fields)


async def isolating(
    items: Sequence[T],
    apply: Callable[[Sequence[T]], Awaitable[None]],
    skip: Callable[[T, BaseException], Awaitable[None]],
) -> None:
    """Apply `items` in order as one unit; when the database refuses what one of them carries
    (`Action.ISOLATE`), halve the unit until that item stands alone and `skip` it: the items before
    it are applied before it and the ones after it after, so the state is that of the log without
    it, whatever the batch boundaries (a rebuild isolates the same record)."""
    try:
        await apply(items)
    except Exception as exc:
        if classify(exc) is not Action.ISOLATE:
            raise
        if len(items) == 1:
            await skip(items[0], exc)
            return
        middle = len(items) // 2
        await isolating(items[:middle], apply, skip)
        await isolating(items[middle:], apply, skip)


async def send_all(producer: AIOKafkaProducer, outputs: Sequence[Output], acked: set[int]) -> None:
    """Send what the broker has not acknowledged yet (`acked`: indexes already acknowledged, kept
    across retries): a retry after a partial failure must not send a decision twice (a copy would
    look like a second, first-time answer)."""
    pending = {
        i: await producer.send(out.topic, value=out.value, key=out.key)
        for i, out in enumerate(outputs)
        if i not in acked
    }
    results = await asyncio.gather(*pending.values(), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    acked.update(i for i, r in zip(pending, results, strict=True) if not isinstance(r, BaseException))
    if failed:
        raise failed[0]
