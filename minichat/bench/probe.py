"""What a deployment still has to do, and the correctness figures of what it did (all tenants:
the bench owns every row of its scratch databases)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer

from minichat.kafka_security import kafka_client_options
from minichat.models.topics import INPUT_TOPICS, TopicNames
from minichat.settings import Settings
from minichat.storage.bench import decision_counts, drain_counts, turn_counts
from minichat.storage.db import connect
from minichat.storage.digest import digest
from minichat.tools.kafka import InputLag, topic_partitions


@dataclass(frozen=True)
class Backlog:
    decided: int
    unsettled: int
    unpublished: int
    parked: int
    lag: int

    def done(self, commands: int) -> bool:
        return (
            self.decided >= commands
            and not self.unsettled
            and not self.unpublished
            and not self.parked
            and not self.lag
        )

    def describe(self, commands: int) -> str:
        return (
            f"decided {self.decided}/{commands}, unsettled {self.unsettled}, outbox {self.unpublished}, "
            f"parked {self.parked}, lag {self.lag}"
        )


async def backlog(con: asyncpg.Connection, lag: InputLag) -> Backlog:
    counts = await drain_counts(con)
    return Backlog(counts.decided, counts.unsettled, counts.unpublished, counts.parked, await lag.measure())


@dataclass(frozen=True)
class Outcomes:
    decisions: dict[str, int]
    """`decision/error_code` -> stored decisions."""
    turns: int
    settled: int
    estimated: int
    """Turns settled on an estimate (the watchdog's grace expired before their usage was applied)."""
    adjusted: int

    @property
    def generation_in_progress(self) -> int:
        return self.decisions.get("reject/generation_in_progress", 0)


async def outcomes(con: asyncpg.Connection) -> Outcomes:
    turns = await turn_counts(con)
    return Outcomes(await decision_counts(con), turns.turns, turns.settled, turns.estimated, turns.adjusted)


async def digest_of(settings: Settings) -> str:
    """`minichat digest` of the deployment's database."""
    con = await connect(settings)
    try:
        return (await digest(con)).total
    finally:
        await con.close()


async def input_records(settings: Settings) -> int:
    """Records on the deployment's input topics (end offsets; the topics are fresh, so from 0)."""
    names = TopicNames(settings.topic_prefix)
    topics = [names.full(t) for t in INPUT_TOPICS]
    found = await topic_partitions(settings, topics)
    tps = [tp for t in topics for tp in found.get(t, [])]
    consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return sum(int(v) for v in ends.values())
