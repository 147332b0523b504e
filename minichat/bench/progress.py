"""Progress on stderr: one line when something starts or ends, and a status line every few seconds."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from minichat.tasks import cancel_and_wait


def say(text: str, stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    out.write(f"[bench] {text}\n")
    out.flush()


class Ticker:
    """While entered, writes `label Ns: describe()` every `every` seconds (never message content):
    a phase's status with no total to count against (the tools' progress bar is tools/progress.py)."""

    def __init__(self, label: str, describe: Callable[[], str], every: float = 3.0) -> None:
        self.label = label
        self.describe = describe
        self.every = every
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ticker:
        self.started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"ticker-{self.label}")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await cancel_and_wait(self._task)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)  # a period, not a wait for a condition
            say(f"{self.label} {self.elapsed():.0f}s: {self.describe()}")
