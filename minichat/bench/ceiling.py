"""The ceiling: what this PostgreSQL takes of admission-shaped writes, written the fastest sane way.

Per event (an admitted `turn.requested`): a `chat_turns` row, the user's `messages` row, and the
daily and monthly `total` rows of `quota_usage` upserted (reserve added). Set-based: one `unnest`
statement per table per batch of 500 events, the quota upserts aggregated per row within a batch
and taken in key order, one transaction per batch, two connections writing at once (the users split
between them, so they never wait for each other's row locks: an upper bound). The chats exist
beforehand (not timed), one per event: a chat has at most one running turn. Users as in the drain
(events/40), 5 tenants. Into a scratch database migrated with the project's migrations.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg

from minichat.bench.options import CEILING_BATCH, CEILING_CONNECTIONS
from minichat.bench.scratch import BENCH_POLICY_VERSION, scratch_database
from minichat.bench.traffic import Population, population, sizes
from minichat.models.policy import CatalogModel
from minichat.settings import Settings
from minichat.storage.bench import insert_chats, write_admissions

_NS: Final = uuid.UUID("9adf340e-8e36-5009-a11f-afe188bf1e3a")


@dataclass(frozen=True)
class Batch:
    turns: list[list[Any]]
    messages: list[list[Any]]
    reserves: list[list[Any]]
    day: date


@dataclass
class CeilingResult:
    events_per_round: int
    rounds: list[float] = field(default_factory=list)
    """events/s of each round."""
    batch: int = CEILING_BATCH
    connections: int = CEILING_CONNECTIONS

    @property
    def events_per_s(self) -> float:
        return statistics.median(self.rounds) if self.rounds else 0.0


def _batch(pop: Population, picks: list[int], model: CatalogModel, rng: random.Random, at: datetime) -> Batch:
    turns: list[list[Any]] = [[] for _ in range(10)]
    messages: list[list[Any]] = [[] for _ in range(6)]
    amounts: dict[tuple[uuid.UUID, uuid.UUID, str, date], int] = {}
    today = at.date()
    for n, index in enumerate(picks):
        chat = pop.chats[index]
        moment = at + timedelta(microseconds=n)
        request_id, reserve = uuid.uuid4(), rng.randint(16_500, 22_000)
        reserved = -(-reserve * model.output_tokens_credit_multiplier_micro // 1_000_000)
        row = (uuid.uuid4(), chat.tenant, chat.chat_id, request_id, chat.user, model.id, reserve, reserved)
        for column, value in zip(turns, (*row, moment, model.max_output_tokens), strict=True):
            column.append(value)
        content = " ".join("word" for _ in range(rng.randint(5, 60)))
        for column, value in zip(
            messages, (uuid.uuid4(), chat.tenant, chat.chat_id, request_id, content, moment), strict=True
        ):
            column.append(value)
        for period, start in (("daily", today), ("monthly", today.replace(day=1))):
            key = (chat.tenant, chat.user, period, start)
            amounts[key] = amounts.get(key, 0) + reserved
    reserves: list[list[Any]] = [[] for _ in range(7)]
    for key in sorted(amounts):
        values = (uuid.uuid5(_NS, f"quota:{key}:total"), *key, amounts[key], at)
        for column, value in zip(reserves, values, strict=True):
            column.append(value)
    return Batch(turns, messages, reserves, today)


def plan_round(pop: Population, events: int, model: CatalogModel, seed: int) -> list[list[Batch]]:
    """Per connection, its batches: event k goes to chat k; a user's events to one connection."""
    rng = random.Random(f"ceiling/{seed}")
    user_index = {user: i for i, user in enumerate(pop.users)}
    lanes: list[list[int]] = [[] for _ in range(CEILING_CONNECTIONS)]
    for index, chat in enumerate(pop.chats[:events]):
        lanes[user_index[(chat.tenant, chat.user)] % CEILING_CONNECTIONS].append(index)
    at = datetime.now(UTC)
    return [
        [_batch(pop, lane[i : i + CEILING_BATCH], model, rng, at) for i in range(0, len(lane), CEILING_BATCH)]
        for lane in lanes
    ]


async def _write(con: asyncpg.Connection, batches: list[Batch]) -> None:
    for b in batches:
        await write_admissions(con, b.turns, b.messages, b.reserves, b.day, BENCH_POLICY_VERSION)


async def run_ceiling(
    settings: Settings, model: CatalogModel, events: int, rounds: int, seed: int
) -> CeilingResult:
    _, users = sizes(events)
    result = CeilingResult(events_per_round=events)
    async with scratch_database(settings.admin_url, "ceiling") as url:
        cons = [await asyncpg.connect(url) for _ in range(CEILING_CONNECTIONS)]
        try:
            for r in range(rounds):
                pop = population(events, users, model, seed * 1000 + r)
                await insert_chats(
                    cons[0],
                    [c.chat_id for c in pop.chats],
                    [c.tenant for c in pop.chats],
                    [c.user for c in pop.chats],
                    [model.id] * len(pop.chats),
                )
                lanes = plan_round(pop, events, model, seed * 1000 + r)
                started = time.perf_counter()
                await asyncio.gather(*(_write(con, lane) for con, lane in zip(cons, lanes, strict=True)))
                result.rounds.append(events / (time.perf_counter() - started))
        finally:
            for con in cons:
                await con.close()
    return result
