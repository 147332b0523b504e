"""The worker's web server on `MINICHAT_WEB_HOST`:`MINICHAT_WEB_PORT`: minichat's own aiohttp
server (faust's web server stays off, so its pages are not served). It serves `/health`, `/ready`,
`/metrics` and the read API, and 404 for anything else.

Whoever reaches the port must not be able to hurt the worker's other tenants:
- a connection whose request headers are not complete within `web_header_timeout_s` is closed, and
  beyond `web_max_connections` open connections a new one is closed at once (no file descriptors
  run out, so PostgreSQL and Kafka can still connect);
- at most `read_max_concurrency` requests touching the database run at once; more answer 503 with
  `Retry-After` at once, never queued;
- the read API and the metrics' gauges read through a pool of their own (`read_pool_max`), never
  the engine's; the gauges are refreshed by one task every `GAUGE_REFRESH_S`, never per scrape, so `/metrics`
  answers from memory even with PostgreSQL or Kafka down;
- a malformed request gets its 4xx and at most one warning line (repeats held back), no traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import asyncpg
import mode
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from minichat.models.policy import Policy
from minichat.processors.metrics import Lag, Metrics
from minichat.processors.outages import RepeatLimiter
from minichat.processors.read_api import busy, dumps, read_api_routes
from minichat.processors.tokens import TokenStore
from minichat.settings import Settings
from minichat.storage.db import create_pool
from minichat.storage.metrics import StateGauges, state_gauges

logger = logging.getLogger(__name__)
logger.addFilter(RepeatLimiter())

GAUGE_REFRESH_S = 5.0
"""Seconds between two reads of the database gauges of `/metrics` (a scrape shows the last read)."""
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SHUTDOWN_S = 2.0
"""How long a stopping worker lets requests in hand finish."""


class ReadPool:
    """The read API's and the gauges' own PostgreSQL connections, opened on first use (inside the
    worker's loop) and at most `read_pool_max` of them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await create_pool(
                        self.settings, min_size=0, max_size=self.settings.read_pool_max
                    )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


class GaugeCache:
    """Reads the database gauges into `metrics` every `GAUGE_REFRESH_S` (one task, never per
    scrape): while PostgreSQL is away a scrape shows the last reading and its age."""

    def __init__(self, pool: ReadPool, metrics: Metrics) -> None:
        self.pool = pool
        self.metrics = metrics
        self.latest: StateGauges | None = None

    async def refresh(self) -> None:
        try:
            async with asyncio.timeout(2 * GAUGE_REFRESH_S):
                db = await self.pool()
                async with db.acquire(timeout=GAUGE_REFRESH_S) as con:
                    self.latest = await state_gauges(con)
            self.metrics.set_db_gauges(self.latest)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning(
                "metrics gauges not refreshed (%s); /metrics shows the last ones and their age",
                type(exc).__name__,
            )

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the task must outlive any one reading
                logger.error("metrics gauges refresh failed (%s)", type(exc).__name__)
            await asyncio.sleep(GAUGE_REFRESH_S)


class Slots:
    """Requests in flight on the database-backed routes; `enter` says no when all are taken."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0

    def enter(self) -> bool:
        if self.taken >= self.size:
            return False
        self.taken += 1
        return True

    def leave(self) -> None:
        self.taken -= 1


_ERRORS = {404: "not_found", 405: "method_not_allowed"}
JSON = "application/json"


def _limited(path: str) -> bool:
    return path.startswith("/v1/") or path == "/ready"


def build_web_app(
    settings: Settings,
    policy: Policy,
    pool: ReadPool,
    tokens: TokenStore,
    not_ready: Callable[[], str | None],
    metrics: Metrics,
    gauges: GaugeCache,
    lag: Callable[[], Lag] | None = None,
) -> web.Application:
    """The routes, behind the slots and JSON errors for unknown paths and methods."""
    slots = Slots(settings.read_max_concurrency)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        limited = _limited(request.path)
        if limited and not slots.enter():
            logger.warning("read API busy: %d requests in flight, answering 503", slots.size)
            return busy(f"{slots.size} requests in flight")
        try:
            return await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405, as JSON
            error = (
                "not_found" if exc.status == 404 else "method_not_allowed" if exc.status == 405 else "error"
            )
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return web.Response(
                body=dumps({"error": error}),
                status=exc.status,
                content_type="application/json",
                headers=headers,
            )
        finally:
            if limited:
                slots.leave()

    async def metrics_page(request: web.Request) -> web.StreamResponse:
        """Answers from memory only: a dependency down never fails it (the lag is kept as last
        set if the engine cannot say)."""
        owned: Lag | None = None
        try:
            owned = lag() if lag is not None else None
        except Exception as exc:
            logger.warning("consumer lag not available for /metrics (%s)", type(exc).__name__)
        body = metrics.render(owned)
        return web.Response(body=body.encode(), headers={"Content-Type": METRICS_TYPE})

    app = web.Application(middlewares=[guard])
    app.add_routes(read_api_routes(policy, pool, tokens, not_ready, settings.read_page_max_bytes))
    app.add_routes([web.get("/metrics", metrics_page, name="metrics")])
    return app


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log: a malformed request is one warning line without a traceback (its
    bytes are not logged: they may hold a token); anything else as aiohttp logs it."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            logger.warning("refused a malformed HTTP request (%s)", type(exc_info).__name__)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol of one connection, counted while the connection is open."""

    def __init__(self, inner: asyncio.Protocol, gate: ConnectionGate) -> None:
        self.inner, self.gate = inner, gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.open -= 1
        self.inner.connection_lost(exc)


class ConnectionGate:
    """The protocol factory: aiohttp's protocol while fewer than `cap` connections are open."""

    def __init__(self, make: Callable[[], asyncio.Protocol], cap: int) -> None:
        self.make, self.cap = make, cap
        self.open = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.cap:
            logger.warning("web port at its cap of %d open connections: closing new ones", self.cap)
            return _Refused()
        self.open += 1
        return _Counted(self.make(), self)


class WebService(mode.Service):
    """Serves `app` on the worker's web port while the worker runs, with the gauges' refresh task."""

    def __init__(
        self, settings: Settings, app: web.Application, pool: ReadPool, gauges: GaugeCache, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings, self.app, self.pool, self.gauges = settings, app, pool, gauges
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._refresh: asyncio.Task[None] | None = None
        self.gate: ConnectionGate | None = None

    async def on_start(self) -> None:
        s = self.settings
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            keepalive_timeout=s.web_header_timeout_s,
            logger=cast(logging.Logger, _ServerLog(logging.getLogger("aiohttp.server"), {})),
            shutdown_timeout=SHUTDOWN_S,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self.gate = ConnectionGate(cast(Callable[[], asyncio.Protocol], server), s.web_max_connections)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.gate, s.web_host, s.web_port, backlog=128, reuse_address=True
        )
        self._refresh = asyncio.ensure_future(self.gauges.run())
        logger.info("web server on %s:%d", s.web_host, s.web_port)

    async def on_stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.wait({self._refresh})
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pool.close()


def register_web(
    app: Any,
    settings: Settings,
    policy: Policy,
    not_ready: Callable[[], str | None],
    metrics: Metrics,
    lag: Callable[[], Lag] | None = None,
) -> WebService:
    """Add the web server to the faust app `app` (a service that starts and stops with it)."""
    pool = ReadPool(settings)
    gauges = GaugeCache(pool, metrics)
    tokens = TokenStore(settings.read_tokens_file)
    web_app = build_web_app(settings, policy, pool, tokens, not_ready, metrics, gauges, lag)
    service = WebService(settings, web_app, pool, gauges, loop=app.loop, beacon=app.beacon)
    app.service(service)
    return service
