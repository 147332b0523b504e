"""The watchdog: signals stale turns by writing events, never by changing them.

A running turn with no progress processed for `orphan_timeout_s` gets `turn.orphaned` (with its
current `progress_seq`) on provider-responses; a terminal turn still waiting for usage after
`usage_grace_s` gets `usage.grace_expired` on usage. Both are keyed by `chat_id`, so they queue
behind whatever that chat already has in the log: a progress or usage event that was only late
(consumer lag, a worker restart) is applied first and the signal then changes nothing. All state
changes come from the agents applying these records. Staleness is measured on the processing clock
(the database's `now()`), which is why the event's `occurred_at` is informational only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import faust

from minichat.domain.ids import grace_expired_event_id, orphaned_event_id
from minichat.models.events import TurnOrphaned, UsageGraceExpired, to_json_bytes
from minichat.models.policy import Policy
from minichat.models.topics import TopicNames
from minichat.processors.errors import RetryPolicy, stop_worker, with_retries
from minichat.processors.leadership import WATCHDOG_LOCK, ExclusiveSession, FatalHandler, leader_timer
from minichat.processors.pipeline import Producer
from minichat.processors.records import Output
from minichat.processors.relay import publish
from minichat.processors.runtime import Runtime
from minichat.settings import Settings
from minichat.storage.watchdog import (
    StaleTurn,
    find_grace_expired,
    find_orphans,
    mark_grace_sent,
    mark_orphan_sent,
)

logger = logging.getLogger(__name__)


def orphaned_event(turn: StaleTurn) -> TurnOrphaned:
    return TurnOrphaned(
        event_id=orphaned_event_id(turn.id, turn.progress_seq),
        schema_version=1,
        occurred_at=turn.seen_now,
        tenant_id=turn.tenant_id,
        chat_id=turn.chat_id,
        request_id=turn.request_id,
        progress_seq=turn.progress_seq,
    )


def grace_expired_event(turn: StaleTurn) -> UsageGraceExpired:
    return UsageGraceExpired(
        event_id=grace_expired_event_id(turn.id),
        schema_version=1,
        occurred_at=turn.seen_now,
        tenant_id=turn.tenant_id,
        chat_id=turn.chat_id,
        request_id=turn.request_id,
    )


@dataclass(frozen=True)
class Sweep:
    orphaned: int = 0
    grace_expired: int = 0


@dataclass
class Watchdog:
    """One `tick` per `watchdog_interval_s` on the leader; at most `batch_max` signals of each kind."""

    session: ExclusiveSession
    producer: Callable[[], Awaitable[Producer]]
    topics: TopicNames
    orphan_timeout_s: float
    usage_grace_s: float
    batch_max: int = 500
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    async def tick(self) -> Sweep:
        """Send the due signals, wait for their acks, then remember them (Sweep() if not leader)."""
        result = await with_retries("watchdog", lambda: self.session.run(self._sweep), self.retry)
        return result or Sweep()

    async def _sweep(self, con: asyncpg.Connection) -> Sweep:
        orphans = await find_orphans(con, self.orphan_timeout_s, self.batch_max)
        expired = await find_grace_expired(con, self.usage_grace_s, self.batch_max)
        if not orphans and not expired:
            return Sweep()
        outputs = [
            Output(self.topics.provider_responses, _key(t), to_json_bytes(orphaned_event(t))) for t in orphans
        ] + [Output(self.topics.usage, _key(t), to_json_bytes(grace_expired_event(t))) for t in expired]
        await publish(await self.producer(), outputs)
        # A crash before these marks re-sends the same events next tick; the agents ignore them
        # once the turn is terminal (orphaned) or settled (grace expired).
        await mark_orphan_sent(con, orphans)
        await mark_grace_sent(con, expired)
        logger.info("watchdog: sent %d turn.orphaned, %d usage.grace_expired", len(orphans), len(expired))
        return Sweep(len(orphans), len(expired))


def _key(turn: StaleTurn) -> bytes:
    return str(turn.chat_id).encode("ascii")


def register_watchdog(
    app: faust.App,
    runtime: Runtime,
    settings: Settings,
    policy: Policy,
    *,
    on_fatal: FatalHandler = stop_worker,
) -> Watchdog:
    """Register the watchdog as a leader timer of `app` (every `policy.watchdog_interval_s`)."""

    async def producer() -> Producer:
        return app.producer

    watchdog = Watchdog(
        session=ExclusiveSession(settings.database_url, WATCHDOG_LOCK, f"{settings.group_id}-watchdog"),
        producer=producer,
        topics=runtime.topics,
        orphan_timeout_s=policy.orphan_timeout_s,
        usage_grace_s=policy.usage_grace_s,
        batch_max=settings.watchdog_batch_max,
        retry=RetryPolicy.from_settings(settings),
    )
    leader_timer(app, "watchdog", policy.watchdog_interval_s, watchdog.tick, watchdog.session, on_fatal)
    return watchdog
