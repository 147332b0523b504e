"""A rebalance never waits without end for a Kafka offset commit (`flights.Flights.await_all`)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import OffsetAndMetadata

from minichat.processors.errors import RetryPolicy
from minichat.processors.flights import Flights
from minichat.processors.metrics import Metrics


class Unanswered:
    """What the engine uses of aiokafka's consumer: a commit that never returns, as aiokafka's own
    endless retries of a retriable error (coordinator away) make it."""

    def __init__(self) -> None:
        self.sent: list[dict[TopicPartition, OffsetAndMetadata]] = []

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.sent.append(offsets)
        await asyncio.get_running_loop().create_future()


def test_a_rebalance_gives_up_a_commit_that_does_not_return() -> None:
    fatal: list[str] = []

    async def scenario() -> tuple[bool, list[dict[TopicPartition, OffsetAndMetadata]]]:
        flights = Flights(lambda: None, Metrics(), RetryPolicy(), lambda what, _: fatal.append(what))
        flights.revoke_wait_s = 0.05
        consumer: Any = Unanswered()
        flights.send([], {("t", 0): 5}, [])
        await asyncio.sleep(0)  # no outputs: acknowledged at once
        await flights.land_finished(consumer, {("t", 0)})  # lands it, its commit goes off the loop
        await asyncio.sleep(0)  # the commit is sent
        revoking = asyncio.ensure_future(flights.await_all())
        done, _ = await asyncio.wait([revoking], timeout=30)
        return revoking in done, consumer.sent

    returned, sent = asyncio.run(scenario())
    assert sent == [{TopicPartition("t", 0): OffsetAndMetadata(5, "")}]
    assert returned, "the rebalance callback waited for the commit without end"
    assert fatal == []


class Refusing:
    """A consumer evicted from its group: the coordinator refuses its commits."""

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        raise CommitFailedError("the group has already rebalanced")


def test_acknowledgements_a_commit_could_not_record_are_left_for_postgresql() -> None:
    """A zombie's batches: their outputs acknowledged, their commit refused; unless the engine
    keeps them in PostgreSQL at once, the next owner re-sends those outputs (the zombie soak)."""

    async def scenario() -> tuple[bool, dict[tuple[str, int], int]]:
        flights = Flights(lambda: None, Metrics(), RetryPolicy(), lambda what, exc: None)
        consumer: Any = Refusing()
        flights.send([], {("t", 0): 5}, [])
        await asyncio.sleep(0)
        await flights.land_finished(consumer, {("t", 0)})
        await flights.settle()
        return flights.unrecorded, flights.acknowledged

    assert asyncio.run(scenario()) == (True, {("t", 0): 5})


def test_a_rebalance_leaves_what_it_landed_for_postgresql() -> None:
    async def scenario() -> bool:
        flights = Flights(lambda: None, Metrics(), RetryPolicy(), lambda what, exc: None)
        flights.send([], {("t", 0): 5}, [])
        await flights.await_all()  # no Kafka commit in a rebalance
        return flights.unrecorded

    assert asyncio.run(scenario())
