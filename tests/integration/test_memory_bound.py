"""A burst of big records keeps the worker's memory under the stated bound (issue 10, item 7).

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

import pytest
from aiokafka import AIOKafkaProducer

from minichat.models.topics import TopicNames
from tests.conftest import live_deployment
from tests.support import Endpoints, TopicReader

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
