"""Background asyncio tasks: the one way the package stops one."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (None: nothing started) and return once it has stopped. What it raised is
    not the stopper's business: a reader that died has reported it where it is awaited."""
    if task is None:
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
