"""The simulator's one poller of the database: a chat waits here until its turn left `running`, was
settled or had its usage applied, or until its early event was parked (storage/simulator.py)."""

from __future__ import annotations

import asyncio
from typing import Literal
from uuid import UUID

import asyncpg

from minichat.storage.simulator import TurnStand, parked_requests, turn_stands
from minichat.tasks import cancel_and_wait

WaitKind = Literal["terminal", "settled", "usage", "parked"]
WaitKey = tuple[WaitKind, UUID, UUID, UUID]
"""(kind, tenant, chat, request)"""


class TurnWatcher:
    """One poller for every chat waiting on the database: a turn left `running`, a turn settled,
    or an early event parked. One query per kind per tick, whatever the number of waiters."""

    def __init__(self, pool: asyncpg.Pool, interval: float = 0.05) -> None:
        self._pool = pool
        self._interval = interval
        self._waiting: dict[WaitKey, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.errors = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="turn-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def wait(self, kind: WaitKind, tenant: UUID, chat: UUID, request: UUID, *, within: float) -> bool:
        """True once the condition holds, False when it did not within `within` seconds."""
        key = (kind, tenant, chat, request)
        event = self._waiting.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), within)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(key, None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if not self._waiting:
                continue
            try:
                await self._tick()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.errors += 1  # a waiter times out if the database stays away

    async def _tick(self) -> None:
        keys = list(self._waiting)
        turn_keys = [k for k in keys if k[0] != "parked"]
        parked_keys = [k for k in keys if k[0] == "parked"]
        async with self._pool.acquire() as con:
            if turn_keys:
                found = await turn_stands(con, [k[1:] for k in turn_keys])
                for key in turn_keys:
                    stand = found.get((key[2], key[3]))
                    if stand is not None and _holds(key[0], stand):
                        self._set(key)
            if parked_keys:
                parked = await parked_requests(con, [k[1:] for k in parked_keys])
                for key in parked_keys:
                    if (key[2], key[3]) in parked:
                        self._set(key)

    def _set(self, key: WaitKey) -> None:
        event = self._waiting.get(key)
        if event is not None:
            event.set()


def _holds(kind: WaitKind, stand: TurnStand) -> bool:
    return (
        (kind == "terminal" and stand.state != "running")
        or (kind == "settled" and stand.settled)
        or (kind == "usage" and stand.usage_known)
    )
