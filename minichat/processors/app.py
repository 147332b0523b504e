"""`create_app(settings)`: the faust app, its topics and agents. Nothing is registered at import."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import faust

from minichat.domain.turns import TurnEvent
from minichat.models import events
from minichat.models.policy import Policy, load_policy
from minichat.models.topics import TopicNames
from minichat.processors.errors import RetryPolicy, stop_worker
from minichat.processors.metrics import Metrics, render_metrics
from minichat.processors.outages import BrokerWatch, limit_client_log_repeats, pace_failed_metadata_updates
from minichat.processors.pipeline import BatchProcessor, Handler, Producer
from minichat.processors.records import record_from_event
from minichat.processors.relay import register_relay
from minichat.processors.runtime import Runtime
from minichat.processors.turn_events import TurnEvents
from minichat.processors.turn_requests import TurnRequests
from minichat.processors.watchdog import register_watchdog
from minichat.settings import Settings
from minichat.storage.policies import PolicySnapshots

logger = logging.getLogger(__name__)


def _agent(processor: BatchProcessor[Any], settings: Settings) -> Callable[[Any], Awaitable[None]]:
    async def consume(stream: Any) -> None:  # faust.Stream; its typing lacks take_events
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            try:
                await processor.process([record_from_event(event) for event in batch])
            except Exception as exc:
                stop_worker(processor.name, exc)

    consume.__name__ = processor.name
    return consume


def build_processors(
    settings: Settings,
    policy: Policy,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    producer: Callable[[], Awaitable[Producer]],
    metrics: Metrics | None = None,
) -> dict[str, BatchProcessor[Any]]:
    """The three input topics' processors by full topic name, without faust: the worker's agents,
    `minichat replay` and the benchmark run the same objects."""
    names = TopicNames(settings.topic_prefix)
    metrics = metrics or Metrics()
    snapshots = PolicySnapshots(policy)
    turn_events = TurnEvents(snapshots, names.dead_letters, metrics)
    parked_decoders: dict[str, Callable[[bytes | None, bytes], TurnEvent]] = {
        names.provider_responses: events.decode_provider_event,
        names.usage: events.decode_usage_event,
    }
    turn_requests = TurnRequests(
        policy, snapshots, names.turn_decisions, names.dead_letters, parked_decoders, metrics
    )
    retry = RetryPolicy.from_settings(settings)
    wiring: list[tuple[str, str, Callable[[bytes | None, bytes], Any], Handler[Any]]] = [
        ("turn_requests", names.turn_requests, events.decode_turn_request, turn_requests),
        ("provider_responses", names.provider_responses, events.decode_provider_event, turn_events),
        ("usage", names.usage, events.decode_usage_event, turn_events),
    ]
    return {
        topic: BatchProcessor(
            name=name,
            decode=decode,
            handle=handle,
            pool=pool,
            producer=producer,
            dead_letters_topic=names.dead_letters,
            retry=retry,
            metrics=metrics,
        )
        for name, topic, decode, handle in wiring
    }


def register_broker_watch(
    app: faust.App, settings: Settings, *, on_fatal: Callable[[str, BaseException], None] = stop_worker
) -> BrokerWatch:
    """Probe Kafka every `broker_check_interval_s` on every worker (not only the leader: with the
    broker away nobody knows who leads); stop the worker after `broker_give_up_s` of failures."""
    watch = BrokerWatch(
        settings.kafka_bootstrap_servers,
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


def register_metrics_page(app: faust.App, metrics: Metrics, runtime: Runtime) -> None:
    """`GET /metrics` on the worker's web port: counters of this process, gauges of the state."""

    async def metrics_page(view: Any, request: Any) -> Any:
        body = await render_metrics(metrics, runtime.pool)
        return view.text(body, content_type="text/plain; version=0.0.4")

    app.page("/metrics", name="metrics")(metrics_page)


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> faust.App:
    """Build the worker's faust app: three input agents sharing one pool.

    Raises `PolicyError` when the policy file is invalid.
    """
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    runtime = runtime or Runtime(settings, names)
    pace_failed_metadata_updates()
    limit_client_log_repeats()
    app = faust.App(
        settings.group_id,
        broker=settings.kafka_broker_url,
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        stream_buffer_maxsize=max(4096, settings.batch_max),
        stream_wait_empty=True,
        producer_acks=-1,
        store="memory://",
        table_standby_replicas=0,
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind="127.0.0.1",
    )

    async def producer() -> Producer:
        return app.producer

    metrics = Metrics()
    for topic_name, processor in build_processors(settings, policy, runtime.pool, producer, metrics).items():
        topic = app.topic(topic_name, key_type=bytes, value_type=bytes, partitions=settings.partitions)
        app.agent(channel=topic, name=processor.name)(_agent(processor, settings))

    register_relay(app, runtime, settings, policy)
    register_watchdog(app, runtime, settings, policy)
    register_broker_watch(app, settings)
    register_metrics_page(app, metrics, runtime)

    @app.on_before_shutdown.connect
    async def _close_runtime(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await runtime.close()

    return app
