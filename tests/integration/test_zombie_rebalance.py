"""A zombie owner in a rebalance, with real worker processes (docs/guarantees.md, "A zombie owner
in a rebalance"; issue 22, attack b).

Worker A reaches PostgreSQL through a proxy (tests/pgproxy.py), worker B directly. A batch of A's
is held by the proxy right after its position claim (A's transaction open, the rows it claimed
locked), and A is then frozen (SIGSTOP, as a long pause of the process would): its heartbeats stop,
the group evicts it after its session timeout and hands its partition sets to B. B loads the old
stored positions and its first batch of the set waits on A's rows. Then A is thawed and its batch
released: A commits, having moved only `provider-responses[s]`, and B's batch meets the position
conflict. Before the fix B re-read only the partition that moved, and its batch's `turn-requests`
and `usage` records were never applied: commands unanswered, turns settled on an estimate.

Each episode asserts the interleaving happened (A held inside its claim, B waiting on A's row, B
logging the conflict); the run asserts every command answered once (none replayed, none refused),
every reported usage applied once (every turn settled on its actual usage, charged = spent) and
digest(live) = digest(rebuild). Sizes: `MINICHAT_ZOMBIE_EPISODES` (default 1) in the CI version;
the soak version (marker `soak`, `make soak-zombie`) runs at least 50.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from minichat.models.topics import TopicNames
from minichat.settings import Settings
from tests.conftest import Deployment
from tests.gateway import Event, Gateway
from tests.integration.test_crash import soak_selected
from tests.integration.test_ordered_engine import count, fresh, live_digest, rebuilt_digest
from tests.integration.test_position_conflicts import CONFLICT, lock_waits
from tests.pgproxy import PgProxy
from tests.support import Endpoints, TopicReader, WorkerProcess, run_worker, wait_until

pytestmark = pytest.mark.integration

EPISODES_ENV = "MINICHAT_ZOMBIE_EPISODES"
CI_EPISODES = int(os.environ.get(EPISODES_ENV) or 1)
SOAK_EPISODES = max(50, CI_EPISODES)
CLAIM = "ORDER BY p.topic, p.partition\nFOR UPDATE OF p"
"""The text of the engine's position claim (storage/coordination.py): the proxy holds A after it."""
RESUMED = re.compile(r"engine resumed: \d+ input partition\(s\), partition sets \[([\d, ]*)\]")
CHATS = 16

Chat = tuple[uuid.UUID, uuid.UUID, uuid.UUID]


def owned(worker: WorkerProcess) -> frozenset[int] | None:
    """The partition sets of the worker's latest assignment (None before its first)."""
    found = RESUMED.findall(worker.log())
    if not found:
        return None
    return frozenset(int(p) for p in found[-1].split(",") if p.strip())


class Books:
    """The gateway's side: chats whose partition the test knows, one open turn per chat at a time,
    events produced and acknowledged in the order given."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.names = TopicNames(settings.topic_prefix)
        self.gateway = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
        self.producer = producer
        tenant = uuid.uuid4()
        users = [uuid.uuid4() for _ in range(4)]
        self.chats: list[Chat] = [(tenant, users[i % 4], uuid.uuid4()) for i in range(CHATS)]
        self.open: dict[Chat, Event] = {}
        self.commands = 0
        self.settled = 0

    def partition(self, chat: Chat) -> int:
        hashed: int = murmur2(str(chat[2]).encode())
        return (hashed & 0x7FFFFFFF) % self.settings.partitions

    async def send(self, events: list[tuple[str, Event]]) -> None:
        for topic, event in events:
            await (
                await self.producer.send(
                    topic, json.dumps(event).encode(), key=str(event["chat_id"]).encode()
                )
            )

    def request(self, chats: list[Chat]) -> list[tuple[str, Event]]:
        out = []
        for chat in chats:
            self.open[chat] = self.gateway.requested(*chat, content=f"turn {self.commands}")
            self.commands += 1
            out.append((self.names.turn_requests, self.open[chat]))
        return out

    def complete(self, chats: list[Chat]) -> list[tuple[str, Event]]:
        g = self.gateway
        return [
            (self.names.provider_responses, g.provider("turn.completed", self.open[c], content="ok"))
            for c in chats
        ]

    def report(self, chats: list[Chat]) -> list[tuple[str, Event]]:
        self.settled += len(chats)
        return [(self.names.usage, self.gateway.usage(self.open.pop(c), 100, 20)) for c in chats]

    async def applied(self, timeout: float = 120) -> None:
        """Every command decided, every reported turn settled, nothing parked."""
        url = self.settings.database_url

        async def done() -> bool:
            decided = await count(url, "SELECT count(*) FROM turn_decisions")
            settled = await count(url, "SELECT count(*) FROM chat_turns WHERE settled_at IS NOT NULL")
            parked = await count(url, "SELECT count(*) FROM parked_events")
            return decided == self.commands and settled == self.settled and parked == 0

        try:
            await wait_until(done, timeout=timeout, what="every command decided and every turn settled")
        except AssertionError:
            decided = await count(url, "SELECT count(*) FROM turn_decisions")
            actual = await count(url, "SELECT count(*) FROM chat_turns WHERE settlement_method = 'actual'")
            raise AssertionError(
                f"records skipped: {decided} of {self.commands} commands decided, {actual} of"
                f" {self.settled} turns settled on their reported usage"
            ) from None


def held(proxy: PgProxy) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return proxy.hit.is_set()

    return check


def logged(worker: WorkerProcess, text: str, before: int) -> Callable[[], Awaitable[bool]]:
    """True once `text` is in the worker's log more than `before` times."""

    async def check() -> bool:
        return worker.log().count(text) > before

    return check


async def split_between(
    a: WorkerProcess, b: WorkerProcess, partitions: int
) -> tuple[frozenset[int], frozenset[int]]:
    """Wait until A and B hold disjoint shares of every set, both non-empty."""

    async def split() -> tuple[frozenset[int], frozenset[int]] | None:
        sa, sb = owned(a), owned(b)
        if sa and sb and not sa & sb and sa | sb == frozenset(range(partitions)):
            return sa, sb
        return None

    return await wait_until(split, timeout=90, what="the sets split between A and B")


async def zombie_episode(books: Books, proxy: PgProxy, a: WorkerProcess, b: WorkerProcess) -> str:
    """Precondition: every chat has a decided open turn, A and B share the sets."""
    settings = books.settings
    mine, _ = await split_between(a, b, settings.partitions)
    s_chats = [c for c in books.chats if books.partition(c) in mine]
    target = books.partition(s_chats[0])
    on_target = [c for c in books.chats if books.partition(c) == target]
    others = [c for c in books.chats if c not in on_target]
    conflicts = b.log().count(CONFLICT)
    resumed = len(RESUMED.findall(b.log()))
    proxy.hold_after(CLAIM)
    await books.send(books.complete(on_target))  # A's batch: provider-responses[target] only
    await wait_until(held(proxy), timeout=60, what="A's batch held after its claim")
    os.kill(a.proc.pid, signal.SIGSTOP)  # A's heartbeats stop; its transaction stays open
    try:
        later = books.report(on_target) + books.complete(others) + books.report(others)
        later += books.request(books.chats)
        await books.send(later)  # all in the log before B takes the set: one batch of every lane

        async def b_took_it_and_waits() -> bool:
            sb = owned(b)
            took = len(RESUMED.findall(b.log())) > resumed and sb is not None and target in sb
            return took and await lock_waits(settings.database_url) > 0

        await wait_until(
            b_took_it_and_waits, timeout=90, what="B owning the set, its batch waiting on A's row"
        )
    finally:
        proxy.resume()
        os.kill(a.proc.pid, signal.SIGCONT)
    await books.applied()
    await wait_until(logged(b, CONFLICT, conflicts), timeout=30, what="B's position conflict")
    return f"set {target}: A held in its claim and evicted, B's batch conflicted and re-read"


async def run_episodes(endpoints: Endpoints, template_database: str, tmp_path: Path, episodes: int) -> None:
    async with fresh(endpoints, template_database, tmp_path) as settings:
        names = TopicNames(settings.topic_prefix)
        env = {**Deployment(settings).env(), "MINICHAT_SESSION_TIMEOUT_S": "6"}
        direct = urlsplit(env["MINICHAT_DATABASE_URL"])
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            async with PgProxy(direct.hostname or "127.0.0.1", direct.port or 5432) as proxy:
                a_env = {**env, "MINICHAT_DATABASE_URL": proxy.url(env["MINICHAT_DATABASE_URL"])}
                with run_worker(a_env, tmp_path / "a.log") as a:
                    await wait_until(logged(a, "engine resumed:", 0), timeout=90, what="A assigned")
                    with run_worker(env, tmp_path / "b.log") as b:
                        books = Books(settings, producer)
                        # a whole turn first: every lane has a stored position row (claims lock rows)
                        await books.send(books.request(books.chats))
                        await books.applied()
                        await books.send(books.complete(books.chats) + books.report(books.chats))
                        await books.send(books.request(books.chats))
                        await books.applied()
                        for episode in range(episodes):
                            print(f"episode {episode}:", await zombie_episode(books, proxy, a, b))
                        await books.send(books.complete(books.chats) + books.report(books.chats))
                        await books.applied()
                        # Off the loop: the proxy that carries A's database traffic runs on it, and
                        # A needs PostgreSQL to take B's sets and to stop (a blocking wait froze A).
                        assert await asyncio.to_thread(b.terminate) == 0, b.log()[-3000:]
                    every = frozenset(range(settings.partitions))

                    async def a_took_every_set() -> bool:  # its last `_seek` went through
                        return owned(a) == every

                    await wait_until(a_took_every_set, timeout=60, what="A resuming every set after B")
                    assert await asyncio.to_thread(a.terminate) == 0, a.log()[-3000:]
        finally:
            await producer.stop()
        url = settings.database_url
        async with TopicReader(settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
            values = await reader.wait_for(lambda v: len(v) >= books.commands, timeout=60)
        assert len(values) == books.commands  # every command answered once
        assert len({v["command_event_id"] for v in values}) == books.commands
        assert not [v for v in values if v["replay"]]
        assert {v["decision"] for v in values} == {"allow"}
        # every usage.reported applied once: every turn settled on its actual usage, charged once
        assert (
            await count(url, "SELECT count(*) FROM chat_turns WHERE settlement_method = 'actual'")
            == books.commands
        )
        charged = await count(url, "SELECT sum(committed_credits_micro) FROM chat_turns")
        spent = await count(
            url,
            "SELECT sum(spent_credits_micro) FROM quota_usage"
            " WHERE bucket = 'total' AND period_type = 'daily'",
        )
        assert charged == spent
        assert await live_digest(url) == await rebuilt_digest(settings, endpoints, template_database)
        print(
            f"{episodes} zombie episodes: {books.commands} commands, {len(values)} decisions (0 re-sent),"
            f" {books.settled} turns settled on their reported usage, digest(live) = digest(rebuild)"
        )


@pytest.mark.timeout(600)
async def test_a_zombie_owner_frozen_in_its_batch_loses_nothing_to_the_new_owner(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    await run_episodes(endpoints, template_database, tmp_path, CI_EPISODES)


@pytest.mark.soak
@pytest.mark.timeout(SOAK_EPISODES * 90 + 300)
async def test_soak_zombie_owners(
    endpoints: Endpoints, template_database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not soak_selected(request.config):
        pytest.skip("soak test: run it with `make soak-zombie`")
    await run_episodes(endpoints, template_database, tmp_path, SOAK_EPISODES)
