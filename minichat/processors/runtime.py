"""Resources one worker process shares between its agents, opened lazily inside faust's loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg

from minichat.models.topics import TopicNames
from minichat.settings import Settings
from minichat.storage.db import create_pool


@dataclass
class Runtime:
    settings: Settings
    topics: TopicNames
    _pool: asyncpg.Pool | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def pool(self) -> asyncpg.Pool:
        # faust owns the event loop, so the pool is created on first use, in that loop.
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await create_pool(self.settings)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
