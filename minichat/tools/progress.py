"""The tools' one progress bar (`minichat simulate`'s steps, `minichat replay`'s records)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_REDRAW_S = 0.1
"""A terminal's bar is redrawn at most this often (and always at the end)."""


class Progress:
    """`advance(n)` as work gets done, `finish()` at the end. On a terminal, a bar redrawn in place;
    elsewhere (logs, CI) a line at each quarter, or every `every_s` seconds when that is given. With
    a `unit` the status shows the rate and the time left, else the time spent. Counts only: never
    what the work is about."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        label: str = "",
        *,
        width: int = 30,
        unit: str | None = None,
        every_s: float | None = None,
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.width = width
        self.unit = unit
        self.every_s = every_s
        self.done = 0
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = self.started
        self._milestone = 25

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        now = time.monotonic()
        if self.tty:
            if now - self._drawn >= _REDRAW_S or self.done == self.total:
                self._redraw(now)
        elif self.every_s is None:
            self._milestones()
        elif now - self._drawn >= self.every_s:
            self._write(f"{self.label} {self.status(now)}\n", now)

    def finish(self) -> None:
        now = time.monotonic()
        if self.tty:
            self._redraw(now, final=True)
            self._write("\n", now)
        elif self.every_s is not None:
            self._write(f"{self.label} {self.status(now, final=True)}\n", now)

    def status(self, now: float, *, final: bool = False) -> str:
        """`done/total` and the time spent, or (with a unit) the share, the rate and the time left."""
        elapsed = max(now - self.started, 1e-9)
        if self.unit is None:
            return f"{self.done}/{self.total}  {elapsed:.0f}s"
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        text = f"{self.done}/{self.total} {self._share():4.0%}  {rate:,.0f} {self.unit}/s"
        return text + (f"  {elapsed:.1f}s" if final else f"  ETA {left:.0f}s")

    def line(self, now: float | None = None, *, final: bool = False) -> str:
        """The bar as a terminal shows it."""
        filled = min(self.width, self.width * self.done // self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {self.status(now or time.monotonic(), final=final)}"

    def _share(self) -> float:
        return self.done / self.total if self.total else 1.0

    def _redraw(self, now: float, *, final: bool = False) -> None:
        self._write("\r" + self.line(now, final=final) + "\x1b[K", now)

    def _milestones(self) -> None:
        percent = 100 * self.done // self.total if self.total else 100
        while self._milestone <= 100 and percent >= self._milestone:
            self._write(f"{self.label}: {self.done}/{self.total} ({self._milestone}%)\n", time.monotonic())
            self._milestone += 25

    def _write(self, text: str, now: float) -> None:
        self._drawn = now
        self.stream.write(text)
        self.stream.flush()
