"""Living with a Kafka outage: notice it while no batch arrives, wait without busy-looping or
flooding the log, and stop the worker (through `errors.stop_worker`) when it lasts too long."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka.client import AIOKafkaClient

from minichat.kafka_security import KafkaSecurity
from minichat.processors.errors import GaveUp

logger = logging.getLogger(__name__)


class RepeatLimiter(logging.Filter):
    """Lets each warning or error of a client library through once per `window_s` (per logger and
    message template); the next one that passes says how many it held back.

    During an outage the Kafka and PostgreSQL clients log every reconnect attempt, several times a
    second each; the worker's own retry lines (`with_retries`, `BrokerWatch`) are not limited.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = f"{record.msg} [{last[1]} more like this in the last {now - last[0]:.0f} s]"
        return True


def limit_client_log_repeats(
    window_s: float = 10.0, prefixes: tuple[str, ...] = ("aiokafka", "asyncpg")
) -> None:
    """Install one `RepeatLimiter` on every logger of the client libraries (idempotent).

    A logger's filters see only the records logged on that logger, not its children's, so each
    module's logger gets it; the libraries are imported first so their loggers exist.
    """
    import aiokafka.admin  # noqa: F401  (creates the loggers of every aiokafka module)
    import asyncpg.pool  # noqa: F401

    limiter = RepeatLimiter(window_s)
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] not in prefixes:
            continue
        target = logging.getLogger(name)
        if not any(isinstance(f, RepeatLimiter) for f in target.filters):
            target.addFilter(limiter)


class OnceEach(logging.Filter):
    """Lets each distinct INFO line of the given templates through once: aiokafka logs "Authenticated
    as ..." and "Loading SSL CA from ..." on every connection, and the broker watch connects every
    `broker_check_interval_s`."""

    TEMPLATES = ("Authenticated as %s via %s", "Loading SSL CA from %s")

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.TEMPLATES:
            return True
        line = record.getMessage()
        if line in self._seen:
            return False
        self._seen.add(line)
        return True


def log_connection_lines_once() -> None:
    """Install `OnceEach` on the aiokafka loggers that write those lines (idempotent)."""
    once = OnceEach()
    for name in ("aiokafka.conn", "aiokafka.helpers"):
        target = logging.getLogger(name)
        if not any(isinstance(f, OnceEach) for f in target.filters):
            target.addFilter(once)


def pace_failed_metadata_updates() -> None:
    """Make aiokafka wait its `retry_backoff_ms` after a failed metadata update. Idempotent.

    While a partition has records to send and no known leader (the broker is down), aiokafka's
    producer loop asks for metadata again as soon as the previous request failed, without the
    backoff its own comment promises: with the broker's port closed that is a busy loop (about a
    thousand refused connects and two ERROR lines a millisecond apart, one CPU core at 100 %).
    After this, a failed update reports its failure only after the backoff.
    """
    original = getattr(AIOKafkaClient, "_metadata_update", None)
    if original is None or getattr(original, "_paced", False):
        return

    async def _metadata_update(self: AIOKafkaClient, cluster_metadata: object, topics: object) -> object:
        updated = await original(self, cluster_metadata, topics)
        if not updated:
            await asyncio.sleep(getattr(self, "_retry_backoff", 0.1))
        return updated

    _metadata_update._paced = True  # type: ignore[attr-defined]
    AIOKafkaClient._metadata_update = _metadata_update


class BrokerWatch:
    """Notices a Kafka outage while no batch arrives: without records nothing else fails.

    `check` asks the cluster for metadata (bounded by `timeout_s`); a failure is logged, and when
    the probes have failed for `give_up_s` in a row it raises `GaveUp` naming the brokers. The
    faust client reconnects by itself; this only bounds how long the worker waits for it.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        give_up_s: float,
        timeout_s: float,
        probe: Callable[[], Awaitable[object]] | None = None,
        security: KafkaSecurity | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._client_options = (security or KafkaSecurity()).client_options()  # one TLS context
        self.give_up_s = give_up_s
        self.timeout_s = timeout_s
        self._probe = probe or self._metadata
        self._clock = clock
        self.down_since: float | None = None
        self.failures = 0

    async def check(self) -> bool:
        """True when the cluster answered; raises `GaveUp` once it has not for `give_up_s`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._probe()
        except Exception as exc:
            now = self._clock()
            if self.down_since is None:
                self.down_since = now
            self.failures += 1
            down = now - self.down_since
            if down >= self.give_up_s:
                raise GaveUp(
                    f"Kafka at {self.bootstrap_servers} unreachable for {down:.0f} s "
                    f"({self.failures} failed metadata requests, last error {type(exc).__name__}); "
                    f"giving up after {self.give_up_s:g} s"
                ) from exc
            logger.warning(
                "Kafka at %s unreachable for %.0f s (%s); the worker waits, and stops after %g s",
                self.bootstrap_servers,
                down,
                type(exc).__name__,
                self.give_up_s,
            )
            return False
        if self.down_since is not None:
            down = self._clock() - self.down_since
            logger.warning("Kafka at %s reachable again after %.0f s", self.bootstrap_servers, down)
            self.down_since = None
            self.failures = 0
        return True

    async def _metadata(self) -> None:
        # A fresh client each time: its bootstrap is one metadata request to the first broker of
        # the list that answers, and no state survives an outage.
        client = AIOKafkaClient(
            bootstrap_servers=self.bootstrap_servers,
            **self._client_options,
            client_id="minichat-broker-watch",
            request_timeout_ms=max(1, int(self.timeout_s * 1000)),
        )
        try:
            await client.bootstrap()
        finally:
            await client.close()
