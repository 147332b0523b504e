"""The read API and the web port under abuse, against a live worker (docs/contract.md, "Read API";
docs/security.md, the read API): one token must not take the worker down for every tenant.

A chat of 40 messages of ~900 KiB pages under the byte budget; 50 concurrent big-page requests
leave the worker deciding turns (decision p99 under 1 s) and under the README's memory bound,
the requests beyond the limit answered 503 with Retry-After; malformed headers, cursors and
parameters get their 4xx and no traceback in the log; clients that never finish their headers are
cut off at the deadline and the connection cap holds; faust's pages are not served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from minichat.bench.workers import free_port
from minichat.models.topics import TopicNames
from minichat.processors.tokens import add_token
from tests.conftest import Live, live_deployment
from tests.gateway import policy_file
from tests.openapi_check import check_response, read_checked
from tests.support import Endpoints, MetricSamples, scrape_metrics, wait_until

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
PAGE_MAX_BYTES = 4 * MIB  # the default of MINICHAT_READ_PAGE_MAX_BYTES
BIG_TURNS = 20  # 40 messages
UNIT = "x" * 1000 + '🙂\n"'  # 1,006 bytes of UTF-8; escapes on the wire and in JSON
BIG_UNITS = 915  # ~899 KiB of UTF-8 a message, ~930 KB as a record: under the 1 MiB limit
HEADER_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64
CONCURRENCY = 8  # the default of MINICHAT_READ_MAX_CONCURRENCY
ATTACKERS = 50
README_BOUND_MIB = 310
"""README "Memory": the worker's resident size stays under about 310 MiB with the defaults."""


@dataclass
class Abuse:
    live: Live
    port: int
    token: str
    tenant: uuid.UUID
    chat: uuid.UUID
    """a chat of BIG_TURNS turns of ~900 KiB messages"""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        return "\n".join(w.log() for w in self.live.workers)


def big_content(i: int, role: str) -> str:
    return f"{role} {i} " + UNIT * BIG_UNITS


async def send_turns(live: Live, tenant: uuid.UUID, chat: uuid.UUID, contents: list[tuple[str, str]]) -> None:
    """A chat's turns as a gateway sends them (each request, then its completion), through one
    producer that waits for each acknowledgement so the records land in that order."""
    gw = live.gateway
    names = TopicNames(live.settings.topic_prefix)
    producer = AIOKafkaProducer(bootstrap_servers=live.settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        user = uuid.uuid4()
        for question, answer in contents:
            command = gw.requested(tenant, user, chat, content=question)
            usage = {"input_tokens": 10, "output_tokens": 20}  # settles at once
            completed = gw.provider("turn.completed", command, content=answer, usage=usage)
            for topic, event in ((names.turn_requests, command), (names.provider_responses, completed)):
                await producer.send_and_wait(topic, json.dumps(event).encode(), key=str(chat).encode())
    finally:
        await producer.stop()

    async def settled() -> bool:
        count = await live.db.fetchval(
            "SELECT count(*) FROM chat_turns WHERE chat_id = $1 AND settled_at IS NOT NULL", chat
        )
        return bool(count == len(contents))

    await wait_until(settled, timeout=90, what=f"{len(contents)} turns settled")


@pytest.fixture(scope="module")
async def abuse(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Abuse]:
    workdir = tmp_path_factory.mktemp("read-api-abuse")
    tenant = uuid.uuid4()
    tokens_file = workdir / "tokens.json"
    token = add_token(tokens_file, tenant)
    port = free_port()
    env = {
        "MINICHAT_WEB_ENABLED": "true",
        "MINICHAT_WEB_PORT": str(port),
        "MINICHAT_READ_TOKENS_FILE": str(tokens_file),
        "MINICHAT_WEB_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "MINICHAT_WEB_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    async with live_deployment(
        endpoints, template_database, workdir, policy=policy_file(workdir), env=env
    ) as live:
        found = Abuse(live, port, token, tenant, uuid.uuid4())

        async def ready() -> bool:
            status, _ = await get(found, "/ready")
            return status == 200

        await wait_until(ready, timeout=60, what="/ready")
        contents = [(big_content(i, "user"), big_content(i, "assistant")) for i in range(BIG_TURNS)]
        await send_turns(live, tenant, found.chat, contents)
        yield found


async def get(abuse: Abuse, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(abuse.base + path, headers=headers) as response,
        ):
            return response.status, await read_checked(response)
    except aiohttp.ClientError:
        return 0, None


async def raw_request(port: int, request: bytes) -> bytes:
    """`request` as bytes on a socket of its own, and the whole answer until the server closes the
    connection (b"" when it closed or reset it without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def checked_status(request: bytes, answer: bytes) -> int:
    """The status of a raw `answer` to a raw `request`, after checking a JSON answer against
    docs/openapi.yaml like every other read API answer. An answer the HTTP parser gives before any
    route is reached (malformed request line or headers) has no JSON body: then only its status."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = status_of(answer)
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])
    }
    if headers.get("content-type", "").split(";")[0] == "application/json":
        method, target, _ = request.split(b" ", 2)
        check_response(target.decode(), status, json.loads(body), method=method.decode().lower())
    return status


async def test_a_chat_of_big_messages_pages_under_the_byte_budget_in_order(abuse: Abuse) -> None:
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    async with aiohttp.ClientSession() as http:
        while True:
            query = f"?limit=500&after={cursor}" if cursor else "?limit=500"
            url = f"{abuse.base}/v1/chats/{abuse.chat}/messages{query}"
            async with http.get(url, headers=abuse.auth()) as response:
                assert response.status == 200
                body = await response.read()
            assert len(body) <= PAGE_MAX_BYTES and response.content_length == len(body)
            check_response(url, response.status, json.loads(body))
            assert "🙂".encode() in body and b"\\ud83d" not in body  # UTF-8, not escaped
            page = json.loads(body)
            assert page["messages"]  # a page always holds one message at least
            seen += page["messages"]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                break
    assert pages >= 10  # 4 of these a page at most
    expected = [(role, big_content(i, role)) for i in range(BIG_TURNS) for role in ("user", "assistant")]
    assert [(m["role"], m["content"]) for m in seen] == expected


async def test_messages_come_in_conversation_order_whatever_their_times(abuse: Abuse) -> None:
    """The assistant's message is stamped with its completion's append time, on another
    partition (another broker's clock): earlier than its question, or the same millisecond, it
    still comes after it, and before the next turn."""
    live, chat = abuse.live, uuid.uuid4()
    await send_turns(live, abuse.tenant, chat, [(f"q{i}", f"a{i}") for i in range(3)])
    rows = await live.db.fetch(
        "SELECT request_id, created_at FROM messages WHERE chat_id = $1 AND role = 'user'", chat
    )
    shifts = (timedelta(seconds=-5), timedelta(0), timedelta(milliseconds=-1))
    for shift, row in zip(shifts, sorted(rows, key=lambda r: r[1]), strict=True):
        await live.db.execute(
            "UPDATE messages SET created_at = $2::timestamptz + $3::interval"
            " WHERE chat_id = $1 AND request_id = $4 AND role = 'assistant'",
            chat,
            row["created_at"],
            shift,
            row["request_id"],
        )
    expected = ["q0", "a0", "q1", "a1", "q2", "a2"]
    status, body = await get(abuse, f"/v1/chats/{chat}/messages", abuse.auth())
    assert status == 200 and [m["content"] for m in body["messages"]] == expected
    paged, cursor = [], None  # one at a time: the cursors keep the order too
    while True:
        query = f"?limit=1&after={cursor}" if cursor else "?limit=1"
        status, body = await get(abuse, f"/v1/chats/{chat}/messages{query}", abuse.auth())
        assert status == 200, body
        paged += [m["content"] for m in body["messages"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert paged == expected


def rss_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def decisions_within(samples: MetricSamples, bound: str) -> tuple[float, float]:
    """(decisions at most `bound` seconds, all decisions) of the worker's latency histogram."""
    return (
        samples.get(("minichat_decision_seconds_bucket", (("le", bound),)), 0.0),
        samples.get(("minichat_decision_seconds_count", ()), 0.0),
    )


async def test_fifty_concurrent_big_pages_leave_the_worker_deciding_turns(abuse: Abuse) -> None:
    pid = abuse.live.workers[0].proc.pid
    before = await scrape_metrics(abuse.port)
    assert before is not None
    statuses: list[int] = []
    retry_after: set[str | None] = set()
    stop = asyncio.Event()
    url = f"{abuse.base}/v1/chats/{abuse.chat}/messages?limit=500"

    async def attacker(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():  # hostile: no pause after a 503
            async with http.get(url, headers=abuse.auth()) as response:
                chunks = [chunk async for chunk in response.content.iter_chunked(256 * 1024)]
                assert sum(map(len, chunks)) <= PAGE_MAX_BYTES
                if response.status not in statuses:  # one of each: a 4 MiB check costs the attack its pace
                    check_response(url, response.status, json.loads(b"".join(chunks)))
                statuses.append(response.status)
                if response.status == 503:
                    retry_after.add(response.headers.get("Retry-After"))

    peak_rss = 0.0

    async def sample_rss() -> None:
        nonlocal peak_rss
        while not stop.is_set():
            peak_rss = max(peak_rss, rss_mib(pid, "VmRSS"))
            await asyncio.sleep(0.05)  # sampling, not waiting for a condition

    gw = abuse.live.gateway
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=ATTACKERS, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.ensure_future(attacker(http)) for _ in range(ATTACKERS)]
        sampler = asyncio.ensure_future(sample_rss())
        try:

            async def under_way() -> bool:
                return len(statuses) >= ATTACKERS

            await wait_until(under_way, what="the attack under way")
            for _ in range(15):  # turns of another tenant, decided one after another during the attack
                started = time.monotonic()
                [decision] = await gw.decide(gw.requested(uuid.uuid4(), uuid.uuid4(), uuid.uuid4()))
                latencies.append(time.monotonic() - started)
                assert decision["decision"] == "allow"
        finally:
            stop.set()
            await asyncio.gather(*tasks, sampler)
    after = await scrape_metrics(abuse.port)
    assert after is not None
    (within_after, total_after), (within_before, total_before) = (
        decisions_within(after, "1.0"),
        decisions_within(before, "1.0"),
    )
    within, total = within_after - within_before, total_after - total_before
    assert total >= 15 and within / total >= 0.99, (within, total, latencies)
    assert 200 in statuses and 503 in statuses and retry_after == {"1"}, set(statuses)
    assert set(statuses) <= {200, 503}
    peak = max(peak_rss, rss_mib(pid, "VmHWM"))
    assert peak < README_BOUND_MIB, peak
    print(
        f"attack: {len(statuses)} requests ({statuses.count(503)} answered 503), decisions client-side "
        f"max {max(latencies):.3f} s, worker RSS peak {peak:.0f} MiB"
    )


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_malformed_input_gets_its_4xx_and_no_traceback(abuse: Abuse) -> None:
    chat = f"/v1/chats/{abuse.chat}/messages"
    ids = f"{uuid.uuid4()}|0|{uuid.uuid4()}"
    for query in (
        "?limit=0",
        "?limit=-1",
        "?limit=1_0",
        "?limit=%EF%BC%91",  # a fullwidth digit one
        "?limit=%ff",
        "?limit=99999999999999999999",
        "?after=not-a-cursor",
        f"?after={cursor_of('1|0001-01-01T00:00+14:00|' + ids)}",  # before year 1 in UTC
        f"?after={cursor_of('1|9999-12-31T23:59-14:00|' + ids)}",  # after year 9999 in UTC
        f"?after={cursor_of('1|2026-01-01T00:00|' + ids)}",  # no time zone
        f"?after={cursor_of('-1|2026-01-01T00:00+00:00|' + ids)}",  # no such turn number
        f"?after={cursor_of('2026-01-01T00:00+00:00|' + ids)}",  # the shape before turn numbers
        f"?after={cursor_of('2026-01-01T00:00+00:00|' + str(uuid.uuid4()))}",  # the oldest shape
        "?after=" + "A" * 4000,
        "?after=%C3%A9",
    ):
        status, body = await get(abuse, chat + query, abuse.auth())
        assert (status, body["error"]) == (400, "bad_request"), query
    for path in ("/v1/chats/not-a-uuid/messages", f"/v1/chats/{abuse.chat}/turns/{'1' * 5000}"):
        assert (await get(abuse, path, abuse.auth()))[0] == 404
    # headers aiohttp's client would not send: raw bytes on a socket
    for header in (b"Bearer \xff\xfe", b"Bearer \xc3\xa9t\xc3\xa9", b"\x00\x01", b"Bearer " + b"\x80" * 100):
        request = (
            b"GET " + chat.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
            + header + b"\r\n\r\n"
        )  # fmt: skip
        answer = await raw_request(abuse.port, request)
        assert checked_status(request, answer) in (400, 401), (header, answer[:200])
    for request in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nNot A Header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX: " + b"y" * 20_000 + b"\r\n\r\n",
    ):
        assert checked_status(request, await raw_request(abuse.port, request)) == 400
    answer = await raw_request(abuse.port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64)
    assert answer == b"" or status_of(answer) == 400  # TLS on the plain port
    log = abuse.log()
    assert "Traceback" not in log and "[ERROR]" not in log, log[-3000:]


@pytest.mark.parametrize(
    "path", ["/", "/router/", "/table/", "/table/x/", "/stats/", "/v2/x", "/metrics/", "/health/x", "/..%2f"]
)
async def test_only_the_contracts_paths_are_served(abuse: Abuse, path: str) -> None:
    assert await get(abuse, path) == (404, {"error": "not_found"})


async def test_a_wrong_method_is_refused(abuse: Abuse) -> None:
    request = b"POST /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    answer = await raw_request(abuse.port, request)
    assert checked_status(request, answer) == 405


async def test_unfinished_headers_are_cut_off_and_the_connection_cap_holds(abuse: Abuse) -> None:
    opened = []
    for _ in range(MAX_CONNECTIONS + 16):  # bounded, on loopback
        reader, writer = await asyncio.open_connection("127.0.0.1", abuse.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        opened.append((reader, writer))
    started = time.monotonic()

    async def closed_after(reader: asyncio.StreamReader) -> float:
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), timeout=HEADER_TIMEOUT_S + 5)
        return time.monotonic() - started

    waits = asyncio.gather(*(closed_after(r) for r, _ in opened))
    # while the cap is full, one more client is turned away at once
    answer = await raw_request(abuse.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer == b""
    times = await waits
    for _, writer in opened:
        writer.close()
    at_once = [t for t in times if t < HEADER_TIMEOUT_S / 2]
    assert len(at_once) >= 16  # over the cap: closed as soon as accepted
    assert max(times) < HEADER_TIMEOUT_S + 2  # the rest: at the header deadline
    assert await get(abuse, "/health") == (200, {"status": "ok"})  # and the port serves again
    log = abuse.log()
    assert "Traceback" not in log
    assert log.count("web port at its cap") <= 3  # one line, repeats held back
