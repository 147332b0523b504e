"""The read API's routes on an in-process aiohttp server over a scratch database, for tests that
apply records through the engine's batches themselves (no worker process) and read the result
through the real routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestServer

from minichat.models.policy import load_policy
from minichat.processors.read_api import read_api_routes
from minichat.processors.tokens import TokenStore
from minichat.settings import Settings
from minichat.storage.db import create_pool


@asynccontextmanager
async def serve_read_api(
    settings: Settings, tokens: Path
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """The server's base URL (no trailing slash) and a client session; `tokens` is the token file."""
    pool = await create_pool(settings, min_size=0, max_size=2)

    async def read_pool() -> asyncpg.Pool:
        return pool

    app = web.Application()
    app.add_routes(
        read_api_routes(
            load_policy(settings.policy_file), read_pool, TokenStore(tokens), lambda: None, 1 << 20
        )
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield str(server.make_url("")).rstrip("/"), http
    finally:
        await server.close()
        await pool.close()
