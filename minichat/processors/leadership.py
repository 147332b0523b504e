"""Leadership of the worker's timers: one worker at a time runs the outbox relay, one the
watchdog, elected per run by a PostgreSQL session advisory lock (two workers may briefly both
believe they lead; the lock makes that harmless)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import asyncpg
import faust

from minichat.storage.coordination import try_lock, unlock

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Advisory locks of the leader timers, in the two-int4 key space (the agents and the migrations
# use single bigint keys, a separate space). 0x6D696E69 is "mini".
LOCK_CLASS: Final = 0x6D696E69
RELAY_LOCK: Final = (LOCK_CLASS, 1)
WATCHDOG_LOCK: Final = (LOCK_CLASS, 2)


FatalHandler = Callable[[str, BaseException], None]


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
                if not await try_lock(con, self.lock):
                    return None
                result = await body(con)
                await unlock(con, self.lock)
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
