"""A burst of big records keeps the worker's memory under the stated bound (issue 10, item 7),
and the bound never stalls the worker.

The input topics accept records of up to 4 MiB (so that an oversized one reaches the worker and is
dead-lettered `payload_too_large` with a reason), and the worker used to buffer up to 4,000 records
per input partition and release batches of 2,000 records: gigabytes for big records. Now what
waits in the lanes is bounded in bytes (`INPUT_BUFFER_MAX_BYTES`), and so is a batch
(`BATCH_MAX_BYTES`); README "Memory" states the bound these give.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from tests.conftest import Deployment, deployment_settings, live_deployment
from tests.support import Endpoints, TopicReader, run_worker, scratch_database, wait_until

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
RECORDS = 160
RECORD_BYTES = MIB + MIB // 8  # above the 1 MiB payload limit: each is dead-lettered
INPUT_BUFFER = 16 * MIB
BATCH = 8 * MIB
AT_REST_MIB = 200
"""A worker's resident size after start-up and traffic, with room (77 MiB after this burst, 150 MiB
after a 20,000-turn drain in `minichat bench`)."""


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def stated_bound_mib(input_buffer: int, batch: int, fetch: int, in_flight: int) -> float:
    """README "Memory": at rest, plus the lanes' budget, the Kafka client's fetch, the batch being
    applied (raw and decoded) and the batches whose outputs are in flight."""
    return AT_REST_MIB + (input_buffer + fetch + 2 * batch + in_flight * batch) / MIB


async def test_a_burst_of_big_records_keeps_the_worker_under_its_memory_bound(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    env = {
        "MINICHAT_INPUT_BUFFER_MAX_BYTES": str(INPUT_BUFFER),
        "MINICHAT_BATCH_MAX_BYTES": str(BATCH),
        "MINICHAT_FETCH_MAX_BYTES": str(8 * MIB),
    }
    bound = stated_bound_mib(INPUT_BUFFER, BATCH, 8 * MIB, 4)
    async with live_deployment(endpoints, template_database, tmp_path, env=env) as live:
        names = TopicNames(live.settings.topic_prefix)
        [worker] = live.workers
        # the burst lands while the worker is busy elsewhere: everything is in the log at once
        producer = AIOKafkaProducer(
            bootstrap_servers=endpoints.kafka, acks="all", max_request_size=4 * MIB, linger_ms=20
        )
        await producer.start()
        try:
            body = b'{"type": "turn.requested", "content": "' + b"x" * RECORD_BYTES + b'"}'
            key = str(uuid.uuid4()).encode()  # one partition: the worst case for one lane
            sends = [await producer.send(names.turn_requests, body, key=key) for _ in range(RECORDS)]
            await asyncio.gather(*sends)
        finally:
            await producer.stop()
        async with TopicReader(endpoints.kafka, names.dead_letters) as letters:
            found = await letters.wait_for(
                lambda vs: len(vs) >= RECORDS, timeout=180, what="every dead letter"
            )
        assert {v["error_code"] for v in found} == {"payload_too_large"}
        peak = peak_rss_mib(worker.proc.pid)
        print(
            f"burst of {RECORDS} x {RECORD_BYTES / MIB:.2f} MiB: peak RSS {peak:.0f} MiB, bound {bound:.0f}"
        )
        assert peak <= bound, f"peak RSS {peak:.0f} MiB over the stated bound {bound:.0f} MiB"
        assert worker.proc.poll() is None


async def test_a_lane_paused_by_the_byte_budget_and_emptied_does_not_stall_its_set(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    """Seen at 3,000 requests/s: the byte budget paused a usage lane with records; a batch took
    them; its set then waited for the lane's next record while turn-requests held more than half
    the budget behind it, and the lane stayed paused until that half drained: never. Here: one
    partition set, small usage records before and after big turn-requests records, the
    smallest budget and per-partition fetch, so the usage lane is paused and emptied many times
    while turn-requests holds the budget. Every record must be applied (here dead-lettered: they
    are not events), that is, the stored positions reach the end of the log."""
    small, big, big_bytes = 1500, 12, 200 * 1024
    async with scratch_database(endpoints.database_url, "mb", template=template_database) as url:
        settings = deployment_settings(endpoints, url, partitions=1)
        await create_topics(settings)
        names = TopicNames(settings.topic_prefix)
        producer = AIOKafkaProducer(bootstrap_servers=endpoints.kafka, acks="all", max_request_size=4 * MIB)
        await producer.start()
        try:
            for topic, count, size in (
                (names.usage, small, 100),
                (names.turn_requests, big, big_bytes),
                (names.usage, small, 100),
            ):  # in this order in time: each group acknowledged before the next is sent
                sends = [await producer.send(topic, b"x" * size, key=b"k") for _ in range(count)]
                await asyncio.gather(*sends)
        finally:
            await producer.stop()
        env = {
            **Deployment(settings).env(),
            "MINICHAT_INPUT_BUFFER_MAX_BYTES": str(MIB),
            "MINICHAT_LANE_BUFFER_MAX": "10",
            "MINICHAT_MAX_PARTITION_FETCH_BYTES": str(64 * 1024),
            "MINICHAT_FETCH_MAX_BYTES": str(MIB),
        }
        total = 2 * small + big

        async def applied() -> bool:
            con = await asyncpg.connect(url)
            try:
                stored = await con.fetchval(
                    "SELECT coalesce(sum(next_offset), 0) FROM consumer_positions WHERE group_id = $1",
                    settings.group_id,
                )
            finally:
                await con.close()
            return bool(stored == total)

        with run_worker(env, tmp_path / "worker.log") as worker:
            try:
                await wait_until(applied, timeout=120, what=f"all {total} records applied")
            except AssertionError:
                print(worker.log()[-3000:])
                raise
