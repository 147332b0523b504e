"""The outbox relay: publishes committed billing events to `billing-usage`, then marks them.

Order of durability: produce, await every ack, then mark published. A crash in between publishes
the same rows again on the next run (allowed: billing de-duplicates on `dedupe_key`); a row is
never marked before Kafka has it, so none is lost. One relay at a time (a session advisory lock,
because two workers may briefly both believe they lead) reading in id order keeps each tenant's
events in commit order on the tenant's partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import asyncpg
import faust

from minichat.processors.errors import RetryPolicy, stop_worker, with_retries
from minichat.processors.metrics import Metrics
from minichat.processors.pipeline import Producer
from minichat.processors.records import Output
from minichat.processors.runtime import Runtime
from minichat.settings import Settings
from minichat.storage.outbox import OutboxRow, fetch_unpublished, mark_published

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Advisory locks of the leader timers, in the two-int4 key space (the agents and the migrations
# use single bigint keys, a separate space). 0x6D696E69 is "mini".
LOCK_CLASS: Final = 0x6D696E69
RELAY_LOCK: Final = (LOCK_CLASS, 1)
WATCHDOG_LOCK: Final = (LOCK_CLASS, 2)


FatalHandler = Callable[[str, BaseException], None]

_TRY_LOCK: Final = "SELECT pg_try_advisory_lock($1, $2)"
_UNLOCK: Final = "SELECT pg_advisory_unlock($1, $2)"


class ExclusiveSession:
    """A dedicated connection that runs a body only while it holds a session advisory lock.

    The lock is taken and released around each run, not held while idle, so leadership can move
    to another worker between ticks. After a failure the connection is dropped: the server frees
    its lock with it, and the next run reconnects.
    """

    def __init__(self, dsn: str, lock: tuple[int, int], name: str) -> None:
        self.dsn = dsn
        self.lock = lock
        self.name = name
        self._con: asyncpg.Connection | None = None
        self._busy = asyncio.Lock()
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    async def run(self, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T | None:
        """`body(con)` under the lock; None when another session holds it or this one is closed."""
        if self._closing:
            return None
        async with self._busy:
            if self._closing:
                return None
            con = await self._connection()
            try:
                if not await con.fetchval(_TRY_LOCK, *self.lock):
                    return None
                result = await body(con)
                await con.execute(_UNLOCK, *self.lock)
            except BaseException:
                # A failed run leaves the connection in doubt (dropped by a restart, or mid-query):
                # the next run opens a new one; `errors.classify` decides whether to retry.
                self._discard()
                raise
            return result

    async def close(self, *, wait_s: float = 10.0) -> None:
        """Stop accepting runs, let a run in progress finish (bounded), close the connection."""
        self._closing = True
        try:
            async with asyncio.timeout(wait_s):
                await self._busy.acquire()
        except TimeoutError:
            logger.warning("%s: a run is still in progress at shutdown; cutting it off", self.name)
            self._discard()
            return
        try:
            if self._con is not None:
                con, self._con = self._con, None
                await con.close(timeout=5)
        finally:
            self._busy.release()

    async def _connection(self) -> asyncpg.Connection:
        if self._con is None or self._con.is_closed():
            self._con = await asyncpg.connect(
                self.dsn, command_timeout=60, server_settings={"application_name": self.name}
            )
        return self._con

    def _discard(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            con.terminate()


async def send_all(producer: Producer, outputs: Sequence[Output]) -> None:
    """Produce in order and wait for every ack, even after a failure, before raising the first.

    Waiting for all of them keeps a retry's sends from overlapping the failed attempt's.
    """
    pending = [await producer.send(o.topic, o.key, o.value, None, None, None) for o in outputs]
    results = await asyncio.gather(*pending, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def one_per_turn(rows: Sequence[OutboxRow]) -> Sequence[OutboxRow]:
    """The longest prefix with at most one event per turn.

    A turn's `usage.settled` and `usage.adjusted` are then never in flight together, so a send
    that Kafka fails for good cannot let the adjustment reach billing before the settlement.
    """
    seen: set[str] = set()
    for i, row in enumerate(rows):
        turn = row.dedupe_key.removesuffix("/adjusted")
        if turn in seen:
            return rows[:i]
        seen.add(turn)
    return rows


@dataclass
class OutboxRelay:
    """Drains the outbox; `run_once` is what the leader timer calls and what tests drive."""

    session: ExclusiveSession
    producer: Callable[[], Awaitable[Producer]]
    topic: str
    batch_max: int = 500
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: Metrics = field(default_factory=Metrics)

    async def run_once(self) -> int:
        """Publish every committed unpublished row; returns how many were published (0 if not leader)."""
        published = 0

        async def drain(con: asyncpg.Connection) -> None:
            nonlocal published
            while not self.session.closing:
                rows = await fetch_unpublished(con, self.batch_max)
                batch = one_per_turn(rows)
                if not batch:
                    return
                outputs = [Output(self.topic, str(r.tenant_id).encode("ascii"), r.payload) for r in batch]
                await send_all(await self.producer(), outputs)
                acked = datetime.now(UTC)
                await mark_published(con, batch)
                published += len(batch)
                self.metrics.inc("minichat_billing_published_total", len(batch))
                self.metrics.observe(
                    "minichat_billing_lag_seconds",
                    ((acked - r.stored_seen_at).total_seconds() for r in batch),
                )
                logger.debug("outbox relay: published %d (ids %d..%d)", len(batch), batch[0].id, batch[-1].id)
                if len(batch) == len(rows) and len(rows) < self.batch_max:
                    return

        await with_retries("outbox relay", lambda: self.session.run(drain), self.retry)
        return published


def leader_timer(
    app: faust.App,
    name: str,
    interval_s: float,
    body: Callable[[], Awaitable[Any]],
    session: ExclusiveSession,
    on_fatal: FatalHandler,
    *,
    drain: bool = False,
) -> None:
    """Run `body` every `interval_s` on the leader; its dedicated connection closes on shutdown.

    With `drain`, `body` returns how much it did and runs again at once while that is not 0: a
    loop that never overlaps itself (a faust timer fires on schedule even while the last tick
    still runs, and a relay tick under a drain took 0.2-0.75 s of a 0.2 s interval).

    Transient failures are retried inside `body`; what escapes is fatal, except while the worker
    stops: then the connection or producer going away under a tick is expected, and harmless
    (unmarked rows and unsent signals are simply picked up by the next leader).
    """

    async def tick() -> Any:
        try:
            return await body()
        except Exception as exc:
            if app.should_stop or session.closing:
                logger.info("%s: tick cut short by shutdown (%s)", name, type(exc).__name__)
                return None
            on_fatal(name, exc)

    if drain:

        async def loop() -> None:
            while not (app.should_stop or session.closing):
                if not await tick():
                    await asyncio.sleep(interval_s)  # idle, or another worker leads

        loop.__name__ = loop.__qualname__ = name
        app.task(loop)
    else:
        tick.__name__ = tick.__qualname__ = name
        app.timer(interval_s, name=name)(tick)  # the advisory lock elects: one runs at a time

    @app.on_before_shutdown.connect
    async def _close_session(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await session.close()


def register_relay(
    app: faust.App,
    runtime: Runtime,
    settings: Settings,
    metrics: Metrics,
    *,
    on_fatal: FatalHandler = stop_worker,
) -> OutboxRelay:
    """Register the outbox relay as a leader loop of `app`: it drains while there is work and
    looks again `settings.relay_interval_s` after finding none."""

    async def producer() -> Producer:
        return app.producer

    relay = OutboxRelay(
        session=ExclusiveSession(settings.database_url, RELAY_LOCK, f"{settings.group_id}-outbox-relay"),
        producer=producer,
        topic=runtime.topics.billing_usage,
        batch_max=settings.relay_batch_max,
        retry=RetryPolicy.from_settings(settings),
        metrics=metrics,
    )
    leader_timer(
        app, "outbox_relay", settings.relay_interval_s, relay.run_once, relay.session, on_fatal, drain=True
    )
    return relay
