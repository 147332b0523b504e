"""The spend report `GET /v1/usage` (docs/contract.md, "Read API"): its sums are the settled turns'
charges, tokens and counts for every grouping, an adjustment included, and the billing events'
charges; another tenant's token sees none of it; limits and malformed parameters answer 400.

Turns are applied by the engine's own batches on PostgreSQL (as tests/integration/
test_read_api_order.py does), with explicit record timestamps: the day a turn counts on is its
command's day, which a broker's append time could not choose. The report is read through the read
API's real routes on an in-process server, every answer checked against docs/openapi.yaml."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from minichat.client import ReadApiError, ReadClient
from minichat.domain.spend import MAX_DAYS, MAX_ROWS
from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.batches import MergedBatches
from minichat.processors.pipeline import Decoded
from minichat.processors.records import SourceRecord
from minichat.processors.tokens import add_token
from minichat.settings import Settings
from minichat.storage.db import connect, create_pool
from minichat.storage.policies import ensure_policy_version
from minichat.storage.read_api import reading_as, spend_sql
from tests.conftest import deployment_settings
from tests.gateway import Event, Gateway
from tests.integration.test_read_isolation import without_tenant_filter
from tests.openapi_check import read_checked
from tests.read_server import serve_read_api
from tests.support import Endpoints

pytestmark = pytest.mark.integration

DAY1 = datetime(2026, 12, 6, 23, 59, 0, tzinfo=UTC)
DAY2 = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
GROUPINGS = (
    ("user",),
    ("day",),
    ("model",),
    ("user", "day"),
    ("day", "model"),
    ("user", "model"),
    ("model", "day"),
    ("day", "user", "model"),
)
FIELD = {"user": "user_id", "day": "day", "model": "model"}


@dataclass
class Reader:
    base: str
    http: aiohttp.ClientSession
    token: str

    async def get(self, query: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with self.http.get(f"{self.base}/v1/usage?{query}", headers=headers) as response:
            return response.status, await read_checked(response)


@dataclass
class Served:
    settings: Settings
    tenant: uuid.UUID
    other: uuid.UUID
    reader: Reader
    other_token: str


@pytest.fixture
async def served(endpoints: Endpoints, database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    settings = deployment_settings(endpoints, database_url)
    tenant, other = uuid.uuid4(), uuid.uuid4()
    tokens = tmp_path / "tokens.json"
    token, other_token = add_token(tokens, tenant), add_token(tokens, other)
    async with serve_read_api(settings, tokens) as (base, http):
        yield Served(settings, tenant, other, Reader(base, http, token), other_token)


class Books:
    """Applies a gateway's records through the engine's batches, one at a time, at chosen times."""

    def __init__(self, settings: Settings, con: asyncpg.Connection) -> None:
        self.names = TopicNames(settings.topic_prefix)
        self.batches: MergedBatches = build_batches(settings, load_policy(settings.policy_file))
        self.gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
        self.con = con
        self.offsets: dict[str, int] = defaultdict(int)

    async def apply(self, topic: str, event: Event, at: datetime, *more: Event) -> None:
        """The events in one batch (a batch adds its settlements up before it writes)."""
        records = []
        for e in (event, *more):
            records.append(
                SourceRecord(
                    topic, 0, self.offsets[topic], str(e["chat_id"]).encode(), json.dumps(e).encode(), at
                )
            )
            self.offsets[topic] += 1
        good = [d for d in self.batches.decode(records) if isinstance(d, Decoded)]
        assert len(good) == len(records)
        async with self.con.transaction():
            await self.batches.apply(self.con, good)

    async def turn(
        self, tenant: uuid.UUID, user: uuid.UUID, model: str, at: datetime, usage: tuple[int, int] | None
    ) -> Event:
        """A turn started at `at` and completed a minute later, with inline usage (settled actual)
        or without (waiting for usage)."""
        command = self.gw.requested(tenant, user, uuid.uuid4(), model=model)
        await self.apply(self.names.turn_requests, command, at)
        fields: dict[str, Any] = {"content": "answer"}
        if usage is not None:
            fields["usage"] = {"input_tokens": usage[0], "output_tokens": usage[1]}
        done = self.gw.provider("turn.completed", command, **fields)
        await self.apply(self.names.provider_responses, done, at + timedelta(minutes=1))
        return command


async def settled_turns(con: asyncpg.Connection, tenant: uuid.UUID) -> list[dict[str, Any]]:
    rows = await con.fetch(
        "SELECT requester_user_id, period_daily, effective_model, settlement_method, input_tokens,"
        " output_tokens, committed_credits_micro, adjusted_at FROM chat_turns"
        " WHERE tenant_id = $1 AND settled_at IS NOT NULL",
        tenant,
    )
    return [dict(r) for r in rows]


def expected(turns: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The report computed from the settled turns themselves."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for t in turns:
        value = {
            "user": str(t["requester_user_id"]),
            "day": t["period_daily"].isoformat(),
            "model": t["effective_model"],
        }
        actual = t["settlement_method"] == "actual"
        figures = groups[tuple(value[k] for k in keys)]
        figures[0] += 1
        figures[1] += t["input_tokens"] if actual else 0
        figures[2] += t["output_tokens"] if actual else 0
        figures[3] += t["committed_credits_micro"]
    return [
        {
            **{FIELD[k]: v for k, v in zip(keys, group, strict=True)},
            "turns": f[0],
            "input_tokens": f[1],
            "output_tokens": f[2],
            "charged_credits_micro": f[3],
        }
        for group, f in sorted(groups.items(), key=lambda item: [v.encode() for v in item[0]])
    ]


async def test_the_report_sums_the_settled_turns_for_every_grouping(served: Served) -> None:
    tenant, other = served.tenant, served.other
    alice, bob, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    con = await connect(served.settings)
    try:
        await ensure_policy_version(con, load_policy(served.settings.policy_file))
        books = Books(served.settings, con)
        # DAY1 23:59: settles after midnight, counts on DAY1 (its quota day)
        await books.turn(tenant, alice, "gpt-5-mini", DAY1, (100, 200))
        await books.turn(tenant, alice, "gpt-5-nano", DAY1, (10, 20))
        await books.turn(tenant, alice, "gpt-5-mini", DAY2, (300, 50))
        await books.turn(tenant, bob, "gpt-5-mini", DAY2, (7, 9))
        await books.turn(tenant, bob, "gpt-5-nano", DAY2, (1000, 2000))
        # two of alice's turns settle in one batch (one quota row, one model: added up first)
        pair = [books.gw.requested(tenant, alice, uuid.uuid4(), model="gpt-5-mini") for _ in range(2)]
        for command in pair:
            await books.apply(books.names.turn_requests, command, DAY2)
        usage = {"input_tokens": 11, "output_tokens": 13}
        done = [books.gw.provider("turn.completed", c, content="a", usage=usage) for c in pair]
        await books.apply(books.names.provider_responses, done[0], DAY2, done[1])
        # bob's DAY1 turn settles estimated (usage never came in the grace), then late usage adjusts it
        late = await books.turn(tenant, bob, "gpt-5-mini", DAY1, None)
        expired = books.gw.provider("usage.grace_expired", late)
        await books.apply(books.names.usage, expired, DAY2 + timedelta(hours=1))
        estimated = await con.fetchval(
            "SELECT committed_credits_micro FROM chat_turns WHERE tenant_id = $1 AND request_id = $2",
            tenant,
            uuid.UUID(late["request_id"]),
        )
        await books.apply(books.names.usage, books.gw.usage(late, 40, 60), DAY2 + timedelta(hours=2))
        # carol's turn never settles (still waiting for usage): not in the report
        await books.turn(tenant, carol, "gpt-5-mini", DAY2, None)
        # another tenant's turns, same users and days
        await books.turn(other, alice, "gpt-5-mini", DAY1, (5, 5))
        await books.turn(other, carol, "gpt-5-nano", DAY2, (6, 6))

        turns = await settled_turns(con, tenant)
        assert len(turns) == 8
        [adjusted] = [t for t in turns if t["adjusted_at"] is not None]
        assert adjusted["committed_credits_micro"] != estimated and adjusted["period_daily"] == DAY1.date()
        span = "from=2026-12-01&to=2026-12-31"
        for keys in GROUPINGS:
            query = span + "".join(f"&group_by={k}" for k in keys)
            status, body = await served.reader.get(query)
            assert status == 200, body
            assert body["rows"] == expected(turns, keys), keys
            assert (body["from"], body["to"], body["group_by"], body["user_id"]) == (
                "2026-12-01",
                "2026-12-31",
                list(keys),
                None,
            )
            # one user's rows are that user's share
            status, body = await served.reader.get(f"{query}&user_id={bob}")
            assert status == 200, body
            mine = [t for t in turns if t["requester_user_id"] == bob]
            assert body["rows"] == expected(mine, keys) and body["user_id"] == str(bob), keys

        # the billing events' charges: the last event of each turn (settled, then adjusted)
        billed = await con.fetch("SELECT payload FROM outbox WHERE tenant_id = $1 ORDER BY id", tenant)
        last: dict[str, int] = {}
        for row in billed:
            event = json.loads(row["payload"]) if isinstance(row["payload"], str) else row["payload"]
            last[event["request_id"]] = event["committed_credits_micro"]
        status, body = await served.reader.get(span + "&group_by=day")
        assert sum(r["charged_credits_micro"] for r in body["rows"]) == sum(last.values())
        assert sum(r["turns"] for r in body["rows"]) == len(last) == 8

        # a day range: DAY2 only; an empty range answers no rows
        status, body = await served.reader.get("from=2026-12-07&to=2026-12-07&group_by=user")
        assert body["rows"] == expected([t for t in turns if t["period_daily"] == DAY2.date()], ("user",))
        status, body = await served.reader.get("from=2026-11-01&to=2026-11-30&group_by=user")
        assert (status, body["rows"]) == (200, [])

        # the other tenant's token sees its own turns only, never these
        status, body = await served.reader.get(span + "&group_by=user&group_by=model", served.other_token)
        assert status == 200
        assert body["rows"] == expected(await settled_turns(con, other), ("user", "model"))
        assert sum(r["turns"] for r in body["rows"]) == 2
        status, body = await served.reader.get(f"{span}&group_by=day&user_id={bob}", served.other_token)
        assert (status, body["rows"]) == (200, [])
    finally:
        await con.close()


async def test_the_report_reads_under_row_level_security(served: Served) -> None:
    """Each report statement with its tenant filter taken away still sees only the reader's tenant."""
    con = await connect(served.settings)
    try:
        await ensure_policy_version(con, load_policy(served.settings.policy_file))
        books = Books(served.settings, con)
        user = uuid.uuid4()
        await books.turn(served.tenant, user, "gpt-5-mini", DAY1, (1, 2))
        await books.turn(served.other, user, "gpt-5-nano", DAY1, (3, 4))
    finally:
        await con.close()
    pool = await create_pool(served.settings, min_size=0, max_size=1)
    try:
        for keys in GROUPINGS:
            for one_user in (False, True):
                sql = without_tenant_filter(spend_sql(keys, one_user))
                args: list[Any] = [served.tenant, date(2026, 12, 1), date(2026, 12, 31), 100]
                async with reading_as(pool, served.tenant) as reader:
                    rows = await reader.fetch(sql, *args, *([user] if one_user else []))
                assert sum(r["turns"] for r in rows) == 1, keys
                assert sum(r["charged_credits_micro"] for r in rows) > 0
                if "model" in keys:
                    assert {r["model"] for r in rows} == {"gpt-5-mini"}
    finally:
        await pool.close()


async def test_limits_and_malformed_parameters_answer_400(served: Served) -> None:
    con = await connect(served.settings)
    try:
        # 28 users x 366 days of daily rows with a settled turn each: 10,248 user-day groups
        users = [uuid.uuid4() for _ in range(28)]
        first = date(2025, 1, 1)
        await con.execute(
            "INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket,"
            " spent_credits_micro, calls, updated_at, by_model)"
            " SELECT gen_random_uuid(), $1, u, 'daily', $2::date + d, 'total', 5, 1, now(),"
            " '{\"gpt-5-mini\": [1, 0, 0, 5]}'::jsonb"
            " FROM unnest($3::uuid[]) u, generate_series(0, 365) d",
            served.tenant,
            first,
            users,
        )
    finally:
        await con.close()
    year = "from=2025-01-01&to=2026-01-01"  # 366 days
    assert MAX_DAYS == 366 and MAX_ROWS == 10_000
    status, body = await served.reader.get(year + "&group_by=user&group_by=day")
    assert status == 400 and "10000 rows" in body["detail"], body
    status, body = await served.reader.get(year + "&group_by=day&group_by=user&group_by=model")
    assert status == 400 and "10000 rows" in body["detail"], body
    status, body = await served.reader.get(year + "&group_by=user")
    assert status == 200 and len(body["rows"]) == 28 and {r["turns"] for r in body["rows"]} == {366}
    status, body = await served.reader.get(year + "&group_by=day&group_by=model")
    assert status == 200 and len(body["rows"]) == 366
    status, body = await served.reader.get("from=2025-01-01&to=2026-01-02&group_by=user")
    assert status == 400 and "366 days" in body["detail"], body

    bad = [
        "to=2026-12-31&group_by=user",  # no from
        "from=2026-12-01&group_by=user",  # no to
        "from=2026-12-01&to=2026-12-31",  # no group_by
        "from=2026-13-01&to=2026-12-31&group_by=user",
        "from=2026-02-30&to=2026-12-31&group_by=user",
        "from=20261201&to=2026-12-31&group_by=user",
        "from=2026-12-01T00:00:00Z&to=2026-12-31&group_by=user",
        "from=%EF%BC%92026-12-01&to=2026-12-31&group_by=user",  # a full-width digit
        "from=2026-12-31&to=2026-12-01&group_by=user",  # to before from
        "from=2026-12-01&from=2026-12-02&to=2026-12-31&group_by=user",
        "from=2026-12-01&to=2026-12-31&group_by=week",
        "from=2026-12-01&to=2026-12-31&group_by=",
        "from=2026-12-01&to=2026-12-31&group_by=user&group_by=user",
        "from=2026-12-01&to=2026-12-31&group_by=user,day",
        "from=2026-12-01&to=2026-12-31&group_by=user&user_id=nope",
        "from=2026-12-01&to=2026-12-31&group_by=user&user_id=" + "1" * 100,
        f"from=2026-12-01&to=2026-12-31&group_by=user&user_id={uuid.uuid4()}&user_id={uuid.uuid4()}",
        "from=9999-12-31&to=10000-01-01&group_by=user",
    ]
    for query in bad:
        status, body = await served.reader.get(query)
        assert status == 400 and body["error"] == "bad_request", (query, body)
    status, _ = await served.reader.get("from=2026-12-01&to=2026-12-31&group_by=user", token="nope")
    assert status == 401


async def test_read_client_usage(served: Served) -> None:
    con = await connect(served.settings)
    try:
        await ensure_policy_version(con, load_policy(served.settings.policy_file))
        books = Books(served.settings, con)
        user = uuid.uuid4()
        await books.turn(served.tenant, user, "gpt-5-mini", DAY1, (100, 200))
        await books.turn(served.tenant, user, "gpt-5-nano", DAY2, (10, 20))
        turns = await settled_turns(con, served.tenant)
    finally:
        await con.close()
    async with ReadClient(served.reader.base, served.reader.token) as client:
        rows = await client.usage(date(2026, 12, 1), date(2026, 12, 31), ("day", "model"), user_id=str(user))
        assert [
            {
                "day": r.day.isoformat() if r.day else None,
                "model": r.model,
                "turns": r.turns,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "charged_credits_micro": r.charged_credits_micro,
            }
            for r in rows
        ] == expected(turns, ("day", "model"))
        assert all(r.user_id is None for r in rows)
        with pytest.raises(ReadApiError) as refused:
            await client.usage(date(2026, 12, 31), date(2026, 12, 1), ("user",))
        assert refused.value.status == 400
