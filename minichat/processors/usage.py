"""Handler of the `usage` topic (filled in by the issue that owns it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from minichat.processors.pipeline import Decoded
from minichat.processors.records import Output


async def handle(con: asyncpg.Connection, batch: Sequence[Decoded[Any]]) -> list[Output]:
    return []
