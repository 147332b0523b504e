"""`create_app(settings)`: the faust app, its topics and agents. Nothing is registered at import."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import faust
import mode
from faust.app.base import BootStrategy
from faust.transport.drivers.aiokafka import Producer as FaustKafkaProducer
from faust.types import ProducerT

from minichat.domain.turns import TurnEvent
from minichat.gc_tuning import tune_gc
from minichat.kafka_security import kafka_security
from minichat.models import events
from minichat.models.policy import Policy, load_policy
from minichat.models.topics import TopicNames
from minichat.partitioning import KeyedPartitioner
from minichat.processors.batches import MergedBatches
from minichat.processors.engine import OrderedEngine
from minichat.processors.errors import stop_worker
from minichat.processors.metrics import Metrics
from minichat.processors.outages import (
    BrokerWatch,
    limit_client_log_repeats,
    log_connection_lines_once,
    pace_failed_metadata_updates,
)
from minichat.processors.policy_versions import publish_policy_version
from minichat.processors.relay import register_relay
from minichat.processors.runtime import Runtime
from minichat.processors.turn_events import TurnEvents
from minichat.processors.turn_requests import TurnRequests
from minichat.processors.watchdog import register_watchdog
from minichat.processors.web import register_web
from minichat.settings import Settings
from minichat.storage.policies import PolicySnapshots

logger = logging.getLogger(__name__)


def build_batches(
    settings: Settings,
    policy: Policy,
    metrics: Metrics | None = None,
    *,
    follow_recorded: bool = False,
    versions: Mapping[int, Policy] | None = None,
) -> MergedBatches:
    """The input handlers, without faust: the worker's engine and `minichat replay` run the same
    object (`follow_recorded`: a rebuild applies recorded decisions as recorded, each under its
    own policy version of `versions`)."""
    names = TopicNames(settings.topic_prefix)
    metrics = metrics or Metrics()
    versions = versions or {}
    snapshots = PolicySnapshots(policy, versions.values())
    parked_decoders: dict[str, Callable[[bytes | None, bytes], TurnEvent]] = {
        names.provider_responses: events.decode_provider_event,
        names.usage: events.decode_usage_event,
    }
    return MergedBatches(
        topics=names,
        turn_requests=TurnRequests(
            policy,
            snapshots,
            names.turn_decisions,
            names.dead_letters,
            parked_decoders,
            metrics,
            follow_recorded=follow_recorded,
            versions=versions,
        ),
        turn_events=TurnEvents(snapshots, names.dead_letters, metrics),
        metrics=metrics,
    )


class EngineService(mode.Service):
    """Runs the ordered engine inside the faust worker; stopping it finishes the batch in hand,
    waits for its outputs' acknowledgements, then leaves the group. `announce` runs first, before
    the engine's first decision (the policy version is recorded on `policy-versions`)."""

    def __init__(
        self, engine: OrderedEngine, announce: Callable[[], Awaitable[None]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.engine = engine
        self.announce = announce
        self._task: asyncio.Future[None] | None = None

    async def on_start(self) -> None:
        tune_gc()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            if self.announce is not None:
                await self.announce()
            await self.engine.run()
        except Exception as exc:
            if not self.engine.stopping:
                self.engine.on_fatal("engine", exc)
            logger.info("engine stopped during shutdown (%s)", type(exc).__name__)

    async def on_stop(self) -> None:
        self.engine.stop()
        if self._task is not None:
            await asyncio.wait({self._task})


class _WorkerBoot(BootStrategy):
    """faust's own consumer stays off: the engine owns the input topics and the group."""

    enable_kafka_consumer = False


class _IdempotentProducer(FaustKafkaProducer):
    """faust's producer (the relay's and the watchdog's) with the engine's guarantees: `acks=all`
    and idempotence, so a batch retried across a leader change is written once."""

    def _settings_extra(self) -> Any:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class WorkerApp(faust.App):
    BootStrategy = _WorkerBoot

    def _new_producer(self) -> ProducerT:
        return _IdempotentProducer(self.transport, loop=self.loop, beacon=self.beacon)


def register_broker_watch(
    app: faust.App, settings: Settings, *, on_fatal: Callable[[str, BaseException], None] = stop_worker
) -> BrokerWatch:
    """Probe Kafka every `broker_check_interval_s` on every worker (not only the leader: with the
    broker away nobody knows who leads); stop the worker after `broker_give_up_s` of failures."""
    watch = BrokerWatch(
        settings.kafka_bootstrap_servers,
        security=kafka_security(settings),
        give_up_s=settings.broker_give_up_s,
        timeout_s=max(1.0, settings.broker_check_interval_s),
    )

    async def broker_watch() -> None:
        try:
            await watch.check()
        except Exception as exc:
            if app.should_stop:
                return
            on_fatal("broker watch", exc)

    app.timer(settings.broker_check_interval_s, name="broker_watch")(broker_watch)
    return watch


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> faust.App:
    """Build the worker's faust app: the ordered engine on the input topics, the outbox relay and
    the watchdog (leader-gated by advisory locks), the web server (health, metrics, read API).

    Raises `PolicyError` when the policy file is invalid.
    """
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    runtime = runtime or Runtime(settings, names)
    pace_failed_metadata_updates()
    limit_client_log_repeats()
    log_connection_lines_once()
    app = WorkerApp(
        settings.group_id,
        broker=settings.kafka_broker_url,
        broker_credentials=kafka_security(settings).faust_credentials(),
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        producer_acks=-1,
        producer_partitioner=KeyedPartitioner(),
        store="memory://",
        # faust makes a data directory even with no tables: not in the working directory
        datadir=str(Path(tempfile.gettempdir()) / "minichat-faust-{conf.name}"),
        table_standby_replicas=0,
        # faust's own web server (its `/`, `/router/`, `/table/` pages) stays off: minichat serves
        # its routes on its own server (processors/web.py)
        web_enabled=False,
    )

    metrics = Metrics()
    engine = OrderedEngine(settings, build_batches(settings, policy, metrics), runtime.pool, stop_worker)
    service = EngineService(
        engine, lambda: publish_policy_version(settings, policy), loop=app.loop, beacon=app.beacon
    )
    app.service(service)  # type: ignore[arg-type]  # an instance is accepted too

    register_relay(app, runtime, settings, metrics)
    register_watchdog(app, runtime, settings, policy)
    register_broker_watch(app, settings)
    if settings.web_enabled:
        register_web(app, settings, policy, engine.not_ready, metrics, engine.lag)

    @app.on_before_shutdown.connect
    async def _close_runtime(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await runtime.close()

    return app
