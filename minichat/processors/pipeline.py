"""The one shape of every agent: decode, one transaction per micro-batch, then produce.

```
good, bad = decode(batch)                 # pydantic at the edge; bad -> dead-letters
async with con.transaction():             # retried as a whole on transient errors
    outputs = await handle(con, good)     # load state, decide with domain/, set-based writes
produce(outputs + dead letters)           # after commit, never before; acks awaited
```
A crash between commit and produce replays the batch: every handler is idempotent and a
re-seen command re-sends its stored decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import asyncpg

from minichat.models.events import DeadLetter, DecodeError, to_json_bytes
from minichat.processors.errors import RetryPolicy, with_retries
from minichat.processors.metrics import Metrics
from minichat.processors.records import Output, SourceRecord

logger = logging.getLogger(__name__)

E = TypeVar("E")


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


@dataclass
class BatchProcessor(Generic[E]):
    """Runs one agent's batches; the same object serves the worker, `replay` and the tests."""

    name: str
    decode: Callable[[bytes | None, bytes], E]
    handle: Handler[E]
    pool: Callable[[], Awaitable[asyncpg.Pool]]
    producer: Callable[[], Awaitable[Producer]]
    dead_letters_topic: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: Metrics = field(default_factory=Metrics)

    def split(self, records: Sequence[SourceRecord]) -> tuple[list[Decoded[E]], list[Output]]:
        good: list[Decoded[E]] = []
        dead: list[Output] = []
        for record in records:
            try:
                good.append(Decoded(record, self.decode(record.key, record.value)))
            except DecodeError as error:
                logger.warning(
                    "dead-letter %s[%d]@%d: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    error.code,
                )
                dead.append(dead_letter_for(record, error, self.dead_letters_topic))
                self.metrics.inc("minichat_dead_letters_total", topic=self.name, code=error.code)
        return good, dead

    async def process(self, records: Sequence[SourceRecord]) -> list[Output]:
        good, dead = self.split(records)
        outputs: list[Output] = []
        if good:
            outputs = await with_retries(
                f"{self.name} batch", lambda: self._apply(good), self.retry, dependency="PostgreSQL"
            )
        self.metrics.inc("minichat_records_total", len(good), topic=self.name, outcome="applied")
        self.metrics.inc("minichat_records_total", len(dead), topic=self.name, outcome="dead_letter")
        self.metrics.inc("minichat_batches_total", agent=self.name)
        produced = dead + outputs
        acked: set[int] = set()
        if produced:
            await with_retries(
                f"{self.name} produce",
                lambda: self._produce(produced, acked),
                self.retry,
                dependency="Kafka",
            )
        return produced

    async def _apply(self, good: Sequence[Decoded[E]]) -> list[Output]:
        pool = await self.pool()
        async with pool.acquire() as con, con.transaction():
            return await self.handle(con, good)

    async def _produce(self, outputs: Sequence[Output], acked: set[int]) -> None:
        """Send what the broker has not acknowledged yet: a retry after a partial failure must not
        send a decision twice (a copy would look like a second, first-time answer)."""
        producer = await self.producer()
        pending = {
            i: await producer.send(out.topic, out.key, out.value, None, None, None)
            for i, out in enumerate(outputs)
            if i not in acked
        }
        results = await asyncio.gather(*pending.values(), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        acked.update(i for i, r in zip(pending, results, strict=True) if not isinstance(r, BaseException))
        if failed:
            raise failed[0]
