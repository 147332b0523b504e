"""Waiting until the processor has nothing left to do: every accepted turn settled, no reserve
held, every outbox row published, nothing parked, no input record left unconsumed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from minichat.settings import Settings
from minichat.storage.summary import backlog_counts
from minichat.tools.kafka import InputLag


@dataclass(frozen=True)
class Backlog:
    """What the processor still has to do; all zeros means quiescent."""

    unsettled_turns: int
    reserved_credits_micro: int
    unpublished_outbox: int
    parked_events: int
    input_lag: int

    @property
    def quiescent(self) -> bool:
        return not (
            self.unsettled_turns
            or self.reserved_credits_micro
            or self.unpublished_outbox
            or self.parked_events
            or self.input_lag
        )

    def describe(self) -> str:
        return (
            f"unsettled {self.unsettled_turns}, reserved {self.reserved_credits_micro}, "
            f"outbox {self.unpublished_outbox}, parked {self.parked_events}, lag {self.input_lag}"
        )


async def backlog(con: asyncpg.Connection, lag: InputLag, tenants: Collection[UUID] | None) -> Backlog:
    """One look at what is left to do (database first, then the consumer group's lag)."""
    counts = await backlog_counts(con, tenants)
    return Backlog(
        unsettled_turns=counts.unsettled_turns,
        reserved_credits_micro=counts.reserved_credits_micro,
        unpublished_outbox=counts.unpublished_outbox,
        parked_events=counts.parked_events,
        input_lag=await lag.measure(),
    )


async def wait_quiescent(
    settings: Settings,
    tenants: Collection[UUID] | None,
    *,
    within: float,
    on_poll: Callable[[Backlog], None] | None = None,
    interval: float = 0.25,
) -> Backlog:
    """Poll until the backlog is empty twice in a row, or `within` seconds pass; returns the last look."""
    deadline = time.monotonic() + within
    con = await asyncpg.connect(settings.database_url)
    try:
        async with InputLag(settings) as lag:
            return await _poll_backlog(con, lag, tenants, deadline, on_poll, interval)
    finally:
        await con.close()


async def _poll_backlog(
    con: asyncpg.Connection,
    lag: InputLag,
    tenants: Collection[UUID] | None,
    deadline: float,
    on_poll: Callable[[Backlog], None] | None,
    interval: float,
) -> Backlog:
    clean = 0
    while True:
        look = await backlog(con, lag, tenants)
        if on_poll is not None:
            on_poll(look)
        clean = clean + 1 if look.quiescent else 0
        if clean >= 2 or time.monotonic() > deadline:
            return look
        await asyncio.sleep(interval)
