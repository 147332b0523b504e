"""The outbox relay: publishes committed billing events to `billing-usage` and budget alerts to
`quota-alerts` (by the row's event type), then marks them; then
the applied order to `order-log` (`order_log.py`), then deletes it.

Order of durability: produce, await every ack, then mark published. A crash in between publishes
the same rows again on the next run (allowed: billing de-duplicates on `dedupe_key`); a row is
never marked before Kafka has it, so none is lost. One relay at a time (a session advisory lock,
because two workers may briefly both believe they lead) reading in id order keeps each tenant's
events in commit order on the tenant's partition.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import faust

from minichat.processors.errors import RetryPolicy, stop_worker, with_retries
from minichat.processors.leadership import RELAY_LOCK, ExclusiveSession, FatalHandler, leader_timer
from minichat.processors.metrics import Metrics
from minichat.processors.order_log import relay_order
from minichat.processors.pipeline import Producer, send_all
from minichat.processors.records import Output
from minichat.processors.runtime import Runtime
from minichat.settings import Settings
from minichat.storage.outbox import OutboxRow, fetch_unpublished, mark_published

logger = logging.getLogger(__name__)

ALERT_EVENT_TYPE = "quota.threshold_crossed"


@dataclass(frozen=True)
class _KeywordSend:
    """faust's producer as `pipeline.send_all` calls a producer: aiokafka's `send(topic, value=, key=)`."""

    producer: Producer

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Awaitable[Any]:
        return await self.producer.send(topic, key, value, None, None, None)


async def publish(producer: Producer, outputs: Sequence[Output]) -> None:
    """Produce in order and wait for every ack, even after a failure, before raising the first
    (the engine's `send_all`): a retry's sends never overlap the failed attempt's."""
    await send_all(_KeywordSend(producer), outputs, set())


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
    order_log_topic: str | None = None
    """Also publishes the applied order (`order_log.relay_order`) after the billing events."""
    alerts_topic: str | None = None
    """Where `quota.threshold_crossed` rows go (None: with the billing events)."""

    def topic_of(self, row: OutboxRow) -> str:
        if row.event_type == ALERT_EVENT_TYPE and self.alerts_topic is not None:
            return self.alerts_topic
        return self.topic

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
                outputs = [
                    Output(self.topic_of(r), str(r.tenant_id).encode("ascii"), r.payload) for r in batch
                ]
                await publish(await self.producer(), outputs)
                acked = datetime.now(UTC)
                await mark_published(con, batch)
                published += len(batch)
                alerts = sum(r.event_type == ALERT_EVENT_TYPE for r in batch)
                self.metrics.inc("minichat_billing_published_total", len(batch) - alerts)
                if alerts:
                    self.metrics.inc("minichat_alerts_published_total", alerts)
                self.metrics.observe(
                    "minichat_billing_lag_seconds",
                    ((acked - r.stored_seen_at).total_seconds() for r in batch),
                )
                logger.debug("outbox relay: published %d (ids %d..%d)", len(batch), batch[0].id, batch[-1].id)
                if len(batch) == len(rows) and len(rows) < self.batch_max:
                    return

        async def drain_all(con: asyncpg.Connection) -> None:
            await drain(con)
            if self.order_log_topic is not None and not self.session.closing:
                order = await relay_order(con, await self.producer(), self.order_log_topic, self.batch_max)
                if order:
                    self.metrics.inc("minichat_order_log_published_total", order)

        await with_retries("outbox relay", lambda: self.session.run(drain_all), self.retry)
        return published


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
        order_log_topic=runtime.topics.order_log,
        alerts_topic=runtime.topics.quota_alerts,
    )
    leader_timer(
        app, "outbox_relay", settings.relay_interval_s, relay.run_once, relay.session, on_fatal, drain=True
    )
    return relay
