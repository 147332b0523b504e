"""The ordered engine against the real broker and database (docs/contract.md, "Order of processing"; issue 9).

* a backlog of gateway-paced turns (a chat's next request appended only after its previous turn's
  completion and usage were acknowledged) is drained by one worker and by two: no request is
  refused `generation_in_progress`, and a rebuild into an empty database has the live digest;
* the same traffic live, with no pause before a chat's next request;
* a group offset moved on the broker past records never applied skips nothing;
* offsets acknowledged only in PostgreSQL (a rebalance landed the outputs) are committed on resume;
* a crash between a batch's commit and its produce re-sends its decisions (`replay: true`) and
  applies nothing twice;
* three workers joining and leaving: every partition number's three topics stay with one member.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.structs import OffsetAndMetadata

from minichat.bench.workers import free_port
from minichat.models.topics import TopicNames
from minichat.processors.engine import FAULT_EXIT
from minichat.processors.topics import create_topics
from minichat.settings import Settings
from minichat.storage.digest import digest
from minichat.tools.kafka import InputLag
from minichat.tools.rebuild import run_rebuild
from tests.conftest import Deployment, deployment_settings
from tests.gateway import Gateway, policy_file
from tests.support import (
    Endpoints,
    TopicReader,
    end_offsets,
    run_worker,
    scrape_metrics,
    scratch_database,
    wait_until,
)

pytestmark = pytest.mark.integration

BIG_LIMITS = {
    "standard": {"daily": 10**15, "monthly": 10**15},
    "premium": {"daily": 10**15, "monthly": 10**15},
}


@asynccontextmanager
async def fresh(
    endpoints: Endpoints, template: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Settings]:
    async with scratch_database(endpoints.database_url, "oe", template=template) as url:
        policy = policy_file(tmp_path, version=7, limits=BIG_LIMITS)
        settings = deployment_settings(endpoints, url, policy_file=policy, **overrides)
        await create_topics(settings)
        yield settings


async def count(url: str, sql: str) -> int:
    con = await asyncpg.connect(url)
    try:
        value: int = await con.fetchval(sql)
        return value
    finally:
        await con.close()


class Traffic:
    """A gateway's turns: request, two progress, completion, usage; acknowledged one by one."""

    def __init__(
        self, settings: Settings, tenants: int, users: int, chats: int, turns: int, seed: int
    ) -> None:
        self.settings = settings
        self.names = TopicNames(settings.topic_prefix)
        self.gateway = Gateway(settings, None)  # type: ignore[arg-type]
        rng = random.Random(seed)
        self.tenants = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(tenants)]
        self.users = [(self.tenants[i % tenants], uuid.UUID(int=rng.getrandbits(128))) for i in range(users)]
        self.chats = [(*self.users[i % users], uuid.UUID(int=rng.getrandbits(128))) for i in range(chats)]
        self.turns = turns
        self.commands = 0

    async def play(self, *, decided: TopicReader | None = None) -> None:
        """Every chat concurrently. With `decided`, a chat sends its provider events only once its
        request is decided (a live gateway); without, right after the request's ack (a backlog)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            await asyncio.gather(*(self._chat(producer, chat, decided) for chat in self.chats))
        finally:
            await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, topic: str, event: dict[str, Any]) -> None:
        await (await producer.send(topic, json.dumps(event).encode(), key=str(event["chat_id"]).encode()))

    async def _chat(
        self, producer: AIOKafkaProducer, chat: tuple[uuid.UUID, ...], decided: TopicReader | None
    ) -> None:
        tenant, user, chat_id = chat
        g = self.gateway
        for turn in range(self.turns):
            request = g.requested(tenant, user, chat_id, content=f"turn {turn} " * 20)
            await self._send(producer, self.names.turn_requests, request)
            self.commands += 1
            if decided is not None:
                await decided.wait_for(
                    lambda values, e=request["event_id"]: any(v["command_event_id"] == e for v in values),
                    timeout=60,
                )
            for event in (g.provider("turn.progress", request), g.provider("turn.progress", request)):
                await self._send(producer, self.names.provider_responses, event)
            done = g.provider("turn.completed", request, content="answer " * 10)
            usage = g.usage(request, 300 + turn, 40 + turn)
            await asyncio.gather(
                self._send(producer, self.names.provider_responses, done),
                self._send(producer, self.names.usage, usage),
            )


async def quiet(settings: Settings, commands: int, timeout: float = 180.0) -> None:
    """Every command decided, every accepted turn settled, nothing parked."""
    url = settings.database_url

    async def done() -> bool:
        decided = await count(url, "SELECT count(*) FROM turn_decisions")
        open_turns = await count(url, "SELECT count(*) FROM chat_turns WHERE settled_at IS NULL")
        parked = await count(url, "SELECT count(*) FROM parked_events")
        return decided == commands and open_turns == 0 and parked == 0

    await wait_until(done, timeout=timeout, what=f"{commands} commands decided and settled")


async def rebuilt_digest(settings: Settings, endpoints: Endpoints, template: str) -> dict[str, str]:
    async with scratch_database(endpoints.database_url, "rb", template=template) as url:
        rebuilt = settings.model_copy(update={"database_url": url})
        await run_rebuild(rebuilt, show_progress=False, check_workers=False)
        return await live_digest(url)


async def live_digest(url: str) -> dict[str, str]:
    con = await asyncpg.connect(url)
    try:
        found = await digest(con)
        return {**found.tables, "total": found.total}
    finally:
        await con.close()


async def metric_sums(port: int) -> dict[str, float] | None:
    """The worker's `/metrics`, each sample name's values summed (None while it does not answer)."""
    samples = await scrape_metrics(port)
    if samples is None:
        return None
    sums: dict[str, float] = {}
    for (name, _), value in samples.items():
        sums[name] = sums.get(name, 0.0) + value
    return sums


async def assert_refused_nothing_and_rebuilds(
    settings: Settings, endpoints: Endpoints, template: str
) -> None:
    """No command of the gateway's traffic was rejected (no `generation_in_progress` in
    particular), and a rebuild from the topics into an empty database has the live digest."""
    url = settings.database_url
    refused = await count(
        url, "SELECT count(*) FROM turn_decisions WHERE payload->>'error_code' = 'generation_in_progress'"
    )
    rejected = await count(url, "SELECT count(*) FROM turn_decisions WHERE payload->>'decision' = 'reject'")
    assert (refused, rejected) == (0, 0)
    assert await live_digest(url) == await rebuilt_digest(settings, endpoints, template)


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("workers", "split"),
    [(1, {}), (2, {}), (1, {"apply_parallel": 3, "apply_parallel_min": 2}), (1, {"apply_parallel": 1})],
    ids=["1-worker", "2-workers", "1-worker-every-batch-split", "1-worker-never-split"],
)
async def test_a_backlog_is_refused_nothing_and_rebuilds_the_live_books(
    endpoints: Endpoints, template_database: str, tmp_path: Path, workers: int, split: dict[str, int]
) -> None:
    """(Split: a batch applied as concurrent groups that share no chat and no user must end as the
    rebuild, which applies every batch in one; the defaults split only the batches of 256 records
    or more, so the variants force it on every batch and turn it off.)"""
    async with fresh(endpoints, template_database, tmp_path, **split) as settings:
        traffic = Traffic(settings, tenants=3, users=12, chats=60, turns=5, seed=workers)
        await traffic.play()
        ports = [free_port() for _ in range(workers)]
        tuning = {f"MINICHAT_{name.upper()}": str(value) for name, value in split.items()}
        with ExitStack() as stack:
            for i, port in enumerate(ports):
                web = {"MINICHAT_WEB_ENABLED": "true", "MINICHAT_WEB_PORT": str(port)}
                env = {**Deployment(settings).env(), **tuning, **web}
                stack.enter_context(run_worker(env, tmp_path / f"w{i}.log"))
            await quiet(settings, traffic.commands)
            scraped = [
                await wait_until(lambda p=p: metric_sums(p), timeout=30, what="metrics") for p in ports
            ]
        groups = sum(m.get("minichat_batch_groups_total", 0.0) for m in scraped)
        if split.get("apply_parallel") == 1:
            assert groups == 0
        elif split:
            assert groups >= 2  # at least one batch was applied as two groups or more
        url = settings.database_url
        assert await count(url, "SELECT count(*) FROM chat_turns") == traffic.commands
        assert await count(url, "SELECT coalesce(sum(reserved_credits_micro), 0) FROM quota_usage") == 0
        await assert_refused_nothing_and_rebuilds(settings, endpoints, template_database)


@pytest.mark.timeout(300)
async def test_live_traffic_sending_the_next_request_at_the_terminal_ack_is_refused_nothing(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with fresh(endpoints, template_database, tmp_path) as settings:
        traffic = Traffic(settings, tenants=2, users=6, chats=30, turns=6, seed=11)
        with run_worker(Deployment(settings).env(), tmp_path / "w.log"):
            async with TopicReader(
                settings.kafka_bootstrap_servers, TopicNames(settings.topic_prefix).turn_decisions
            ) as reader:
                await traffic.play(decided=reader)
            await quiet(settings, traffic.commands)
        await assert_refused_nothing_and_rebuilds(settings, endpoints, template_database)


async def commit_group_offsets_to_end(settings: Settings, *, less: int = 0) -> dict[TopicPartition, int]:
    """Commit every input partition's end offset (less `less`, not below 0) for the workers' group."""
    names = TopicNames(settings.topic_prefix)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = [
            TopicPartition(topic, p)
            for topic in (names.turn_requests, names.provider_responses, names.usage)
            for p in range(settings.partitions)
        ]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.commit({tp: OffsetAndMetadata(max(end - less, 0), "") for tp, end in ends.items()})
        return ends
    finally:
        await consumer.stop()


@pytest.mark.timeout(240)
async def test_a_group_offset_moved_past_unapplied_records_skips_none_of_them(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with fresh(endpoints, template_database, tmp_path) as settings:
        traffic = Traffic(settings, tenants=2, users=4, chats=16, turns=2, seed=5)
        await traffic.play()
        ends = await commit_group_offsets_to_end(settings)
        assert sum(ends.values()) == traffic.commands * 5  # the broker now says: all consumed
        with run_worker(Deployment(settings).env(), tmp_path / "w.log"):
            await quiet(settings, traffic.commands)
        async with TopicReader(
            settings.kafka_bootstrap_servers, TopicNames(settings.topic_prefix).turn_decisions
        ) as reader:
            values = await reader.wait_for(lambda v: len(v) >= traffic.commands, timeout=60)
        assert len(values) == traffic.commands
        assert not any(v["replay"] for v in values)
        assert (
            await count(
                settings.database_url, "SELECT count(*) FROM chat_turns WHERE billing_outcome = 'completed'"
            )
            == traffic.commands
        )


@pytest.mark.timeout(240)
async def test_offsets_acknowledged_only_in_postgresql_are_committed_when_a_worker_resumes(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    """A rebalance lands a batch's outputs without committing its offsets (the coordinator is
    moving); the acknowledged offsets are kept in PostgreSQL and the next owner resumes past them.
    With no new record on such a partition nothing would ever commit it: the group's lag, what
    monitoring and `wait_quiescent` read, stayed at 1 for ever (a CI run's `lag 1`)."""
    async with fresh(endpoints, template_database, tmp_path) as settings:
        traffic = Traffic(settings, tenants=2, users=4, chats=16, turns=1, seed=13)
        await traffic.play()
        env = Deployment(settings).env()
        with run_worker(env, tmp_path / "first.log"):
            await quiet(settings, traffic.commands)
            async with InputLag(settings) as lag:
                await wait_until(lambda: returns(lag.measure(), 0), timeout=60, what="the group's lag 0")
        await wait_until(lambda: group_empty(settings), timeout=60, what="the worker out of the group")
        ends = await commit_group_offsets_to_end(settings, less=1)  # as if the last commits were lost
        moved_back = sum(1 for end in ends.values() if end > 0)
        assert moved_back > 1
        async with InputLag(settings) as lag:
            assert await lag.measure() == moved_back
            decisions = [TopicNames(settings.topic_prefix).turn_decisions]
            decided = await end_offsets(settings, decisions)
            with run_worker(env, tmp_path / "second.log"):
                await wait_until(lambda: returns(lag.measure(), 0), timeout=60, what="the group's lag 0")
            assert await end_offsets(settings, decisions) == decided  # resumed where stored: nothing re-sent


async def returns(measured: Awaitable[int], wanted: int) -> bool:
    return await measured == wanted


async def group_empty(settings: Settings) -> bool:
    return (await describe_group(settings))[2] == "Empty"


async def describe_group(settings: Settings) -> Any:
    """The group's description (`DescribeGroupsResponse` group tuple: [2] state, [5] members)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([settings.group_id])
    finally:
        await admin.close()
    return described[0].groups[0]


@pytest.mark.timeout(240)
async def test_a_crash_between_commit_and_produce_resends_the_decisions_and_applies_nothing_twice(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with fresh(endpoints, template_database, tmp_path) as settings:
        names = TopicNames(settings.topic_prefix)
        traffic = Traffic(settings, tenants=2, users=4, chats=12, turns=1, seed=9)
        await traffic.play()
        env = Deployment(settings).env()
        with run_worker(
            {**env, "MINICHAT_FAULT_EXIT_AFTER_COMMIT": "true"}, tmp_path / "crash.log"
        ) as crashing:
            assert await asyncio.to_thread(crashing.proc.wait, 120) == FAULT_EXIT
        applied = await count(settings.database_url, "SELECT count(*) FROM turn_decisions")
        assert applied > 0  # the batch committed ...
        async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
            await reader.poll()
            assert reader.values() == []  # ... and nothing of it was sent
            before = await live_digest(settings.database_url)
            with run_worker(env, tmp_path / "w.log"):
                await quiet(settings, traffic.commands)
                values = await reader.wait_for(lambda v: len(v) >= traffic.commands, timeout=60)
        resent = [v for v in values if v["replay"]]
        assert len(values) == traffic.commands  # one answer per command, none twice
        assert len({v["command_event_id"] for v in values}) == traffic.commands
        assert len(resent) == applied  # the committed batch's decisions, re-sent as stored
        reserved = await count(
            settings.database_url, "SELECT coalesce(sum(reserved_credits_micro), 0) FROM quota_usage"
        )
        assert reserved == 0
        charged = await count(settings.database_url, "SELECT sum(committed_credits_micro) FROM chat_turns")
        spent = await count(
            settings.database_url,
            "SELECT sum(spent_credits_micro) FROM quota_usage"
            " WHERE bucket = 'total' AND period_type = 'daily'",
        )
        assert charged == spent  # charged once per turn
        assert before != await live_digest(settings.database_url)  # the rest was applied afterwards


async def group_layout(settings: Settings) -> dict[str, dict[str, list[int]]] | None:
    """member → topic → partitions, when the group is stable."""
    group = await describe_group(settings)
    state, members = group[2], group[5]
    if state != "Stable":
        return None
    layout: dict[str, dict[str, list[int]]] = {}
    for member in members:
        assignment = ConsumerProtocolMemberAssignment.decode(member[4])
        layout[member[0]] = {topic: sorted(parts) for topic, parts in assignment.assignment}
    return layout


def check_copartitioned(layout: dict[str, dict[str, list[int]]], topics: list[str], partitions: int) -> None:
    owners: dict[int, set[str]] = {}
    for member, by_topic in layout.items():
        numbers = {p for parts in by_topic.values() for p in parts}
        for p in numbers:
            assert all(p in by_topic.get(t, []) for t in topics), (member, p, by_topic)
            owners.setdefault(p, set()).add(member)
    assert sorted(owners) == list(range(partitions))
    assert all(len(members) == 1 for members in owners.values())


@pytest.mark.timeout(300)
async def test_three_workers_joining_and_leaving_keep_each_partition_set_on_one_worker(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with fresh(endpoints, template_database, tmp_path, partitions=6) as settings:
        names = TopicNames(settings.topic_prefix)
        topics = [names.turn_requests, names.provider_responses, names.usage]
        env = {**Deployment(settings).env(), "MINICHAT_SESSION_TIMEOUT_S": "6"}
        traffic = Traffic(settings, tenants=2, users=6, chats=24, turns=3, seed=3)
        player = asyncio.ensure_future(traffic.play())

        async def stable_with(n: int) -> dict[str, dict[str, list[int]]] | None:
            layout = await group_layout(settings)
            return layout if layout is not None and len(layout) == n else None

        with ExitStack() as stack:
            workers = []
            for i in range(3):
                workers.append(stack.enter_context(run_worker(env, tmp_path / f"w{i}.log")))
                layout = await wait_until(lambda n=i + 1: stable_with(n), timeout=90, what=f"{i + 1} members")
                check_copartitioned(layout, topics, settings.partitions)
                assert all(layout[m] for m in layout) or i + 1 > settings.partitions
            assert workers[1].terminate() == 0
            check_copartitioned(
                await wait_until(lambda: stable_with(2), timeout=90), topics, settings.partitions
            )
            workers[0].kill()  # leaves only when its session expires
            check_copartitioned(
                await wait_until(lambda: stable_with(1), timeout=90), topics, settings.partitions
            )
            await player
            await quiet(settings, traffic.commands)
        await assert_refused_nothing_and_rebuilds(settings, endpoints, template_database)
