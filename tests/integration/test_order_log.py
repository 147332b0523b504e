"""The applied order is a fact (docs/contract.md, "Order of processing"; docs/architecture.md,
"Determinism"): each batch transaction records, per partition set, the order it applied the set's
records; the relay publishes it to `order-log` (partition = set); `minichat replay` applies each
set in that order and merges by timestamp only past its end.

On one broker the live worker's order is the timestamp order (one clock, a record readable as soon
as it is appended), so live and merged order cannot be made to differ honestly here. The test
therefore makes the *rebuild's* merge wrong instead (commands sorted ten minutes early, in this
process only) and shows that a rebuild following `order-log` still equals the live digest while
the same wrong merge without it does not: the recorded order, not the merge, decided.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from minichat.models.events import OrderApplied
from minichat.models.topics import TopicNames
from minichat.processors import merge
from minichat.storage.digest import Digest
from minichat.tools.rebuild import RebuildSummary, run_rebuild
from tests.conftest import Live, live_deployment
from tests.gateway import Event
from tests.support import Endpoints, db_digest, scratch_database, wait_until

pytestmark = pytest.mark.integration

CHATS = 8


@pytest.fixture(scope="module")
async def live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    async with live_deployment(
        endpoints, template_database, tmp_path_factory.mktemp("orderlog")
    ) as deployment:
        yield deployment


async def settled(live: Live, command: Event) -> None:
    async def check() -> Any:
        return await live.db.fetchval(
            "SELECT settled_at FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2 AND request_id = $3",
            uuid.UUID(command["tenant_id"]),
            uuid.UUID(command["chat_id"]),
            uuid.UUID(command["request_id"]),
        )

    await wait_until(check, timeout=60, what="the turn to settle")


@pytest.fixture(scope="module")
async def traffic(live: Live) -> Digest:
    """Per chat: a turn completed, the next asked as soon as the completion is sent, completed with
    its usage after it, the chat deleted, asked again (rejected). Then every entry relayed."""
    g = live.gateway
    tenant = uuid.uuid4()
    users = [uuid.uuid4() for _ in range(CHATS)]
    chats = [uuid.uuid4() for _ in range(CHATS)]
    first = [g.requested(tenant, u, c, content="first") for u, c in zip(users, chats, strict=True)]
    assert {a["decision"] for a in await g.decide(*first)} == {"allow"}
    await g.send_provider(
        *(
            g.provider("turn.completed", a, content="one", usage={"input_tokens": 5, "output_tokens": 7})
            for a in first
        )
    )
    second = [g.requested(tenant, u, c, content="second") for u, c in zip(users, chats, strict=True)]
    assert {a["decision"] for a in await g.decide(*second)} == {"allow"}
    await g.send_provider(*(g.provider("turn.completed", b, content="two") for b in second))
    await g.send_usage(*(g.usage(b, 11, 13) for b in second))
    for b in second:
        await settled(live, b)
    done = await g.decide(*(g.delete_chat(tenant, u, c) for u, c in zip(users, chats, strict=True)))
    assert {a["decision"] for a in done} == {"done"}
    again = await g.decide(*(g.requested(tenant, u, c) for u, c in zip(users, chats, strict=True)))
    assert {a["error_code"] for a in again} == {"chat_not_found"}

    async def relayed() -> bool:
        return await live.db.fetchval("SELECT count(*) FROM order_log") == 0

    await wait_until(relayed, timeout=60, what="the applied order to be relayed")
    return await db_digest(live.settings.database_url)


async def read_partitions(live: Live, topics: list[str]) -> dict[TopicPartition, list[Any]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=live.settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(live.settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}

        async def complete() -> bool:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                out[tp].extend(records)
            return all(len(out[tp]) >= ends[tp] for tp in tps)

        await wait_until(complete, timeout=60, what="the topics to be read")
        return out
    finally:
        await consumer.stop()


async def test_every_applied_record_is_in_the_order_log_on_its_sets_partition(
    live: Live, traffic: Digest
) -> None:
    names = TopicNames(live.settings.topic_prefix)
    inputs = await read_partitions(live, names.inputs())
    logged = await read_partitions(live, [names.order_log])
    covered: dict[tuple[str, int], set[int]] = {}
    entries = 0
    for tp, records in logged.items():
        for record in records:
            entry = OrderApplied.model_validate_json(record.value)
            assert entry.partition_set == tp.partition and record.key == str(tp.partition).encode()
            entries += 1
            for topic, first, last in entry.runs:
                assert first <= last
                covered.setdefault((names.full(topic), tp.partition), set()).update(range(first, last + 1))
    assert entries > 0
    for tp, records in inputs.items():
        assert covered.get((tp.topic, tp.partition), set()) == {r.offset for r in records}, tp


async def rebuild(live: Live, url: str, **options: Any) -> tuple[RebuildSummary, Digest]:
    settings = live.settings.model_copy(update={"database_url": url})
    summary = await run_rebuild(settings, show_progress=False, check_workers=False, **options)
    return summary, await db_digest(url)


async def test_a_rebuild_follows_the_recorded_order_where_the_merge_is_wrong(
    live: Live, traffic: Digest, endpoints: Endpoints, template_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blank = endpoints.database_url
    async with scratch_database(blank, "r", template=template_database) as url:
        honest, honest_digest = await rebuild(live, url, follow_order_log=False)
    assert honest_digest == traffic  # one broker: the merge alone is right too

    original = merge._Lane.head_key

    def commands_early(lane: Any) -> merge.OrderKey:
        ts, rank, partition, offset = original(lane)
        return (ts - 600_000 if rank == 2 else ts, rank, partition, offset)

    monkeypatch.setattr(merge._Lane, "head_key", commands_early)
    async with scratch_database(blank, "r", template=template_database) as url:
        wrong, wrong_digest = await rebuild(live, url, follow_order_log=False)
    assert wrong.in_recorded_order == 0
    assert wrong_digest != traffic  # the wrong merge, alone, rebuilds other books
    async with scratch_database(blank, "r", template=template_database) as url:
        followed, followed_digest = await rebuild(live, url)
    assert followed.in_recorded_order == followed.read == honest.read > 0
    assert followed_digest == traffic  # the recorded order decided, not the merge
