"""Budget alerts through the real broker and database (docs/contract.md, "quota.threshold_crossed").

One worker serves the module with a policy whose daily standard limit is 1,000,000 micro-credits
(monthly ones large enough never to alert) and an overshoot tolerance of 1000, so one turn's
actual usage may charge far more than its reserve: a test steers spend to any percentage with
`usage.reported` figures (`charge = ceil(in / 4) + 2 * out` on gpt-5-mini). Each test uses its
own tenant and user; the last ones replay the whole log.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from minichat.domain.ids import ID_NAMESPACE
from minichat.models.topics import TopicNames
from minichat.tools.rebuild import run_rebuild
from tests.conftest import Live, live_deployment
from tests.gateway import Event, policy_file
from tests.support import Endpoints, TopicReader, db_digest, end_offsets, wait_until

pytestmark = pytest.mark.integration

LIMIT = 1_000_000
OVERRIDDEN = uuid.UUID("7d4c0a53-52b8-4f5b-8a43-0f8f8e0d2a25")
"""A tenant whose policy entry carries its own `alerts` ([25]) and a 400,000 daily limit."""


@pytest.fixture(scope="module")
async def live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    workdir = tmp_path_factory.mktemp("alerts")
    policy = policy_file(
        workdir,
        limits={
            "standard": {"daily": LIMIT, "monthly": 10**12},
            "premium": {"daily": LIMIT, "monthly": 10**12},
        },
        tenants={
            str(OVERRIDDEN): {
                "limits": {"standard": {"daily": 400_000}},
                "alerts": {"thresholds_percent": [25]},
            }
        },
        overshoot_tolerance=1000.0,
        usage_grace_s=2,
        watchdog_interval_s=1,
    )
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as deployment:
        yield deployment


@pytest.fixture(scope="module")
async def alerts(live: Live) -> AsyncIterator[TopicReader]:
    topic = TopicNames(live.settings.topic_prefix).quota_alerts
    async with TopicReader(live.settings.kafka_bootstrap_servers, topic) as reader:
        yield reader


def out_tokens(charge: int) -> int:
    """Output tokens that, with 4 input tokens (1 micro-credit), charge exactly `charge`."""
    assert (charge - 1) % 2 == 0
    return (charge - 1) // 2


async def settle_turn(live: Live, tenant: uuid.UUID, user: uuid.UUID, charge: int) -> Event:
    """One turn of `user`, completed with usage that charges `charge`; waits for the settlement."""
    command = live.gateway.requested(tenant, user, uuid.uuid4())
    [decision] = await live.gateway.decide(command)
    assert decision["decision"] == "allow", decision
    usage = {"input_tokens": 4, "output_tokens": out_tokens(charge)}
    await live.gateway.send_provider(
        live.gateway.provider("turn.completed", command, content="a", usage=usage)
    )
    await settled(live, command)
    return command


async def settled(live: Live, command: Event, *, adjusted: bool = False) -> Any:
    column = "adjusted_at" if adjusted else "settled_at"

    async def check() -> Any:
        row = await live.db.fetchrow(
            f"SELECT * FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2 AND request_id = $3"
            f" AND {column} IS NOT NULL",
            uuid.UUID(command["tenant_id"]),
            uuid.UUID(command["chat_id"]),
            uuid.UUID(command["request_id"]),
        )
        return row

    return await wait_until(check, timeout=30, what=f"the turn's {column}")


async def alerts_of(reader: TopicReader, user: uuid.UUID, count: int) -> list[dict[str, Any]]:
    def arrived(values: list[dict[str, Any]]) -> bool:
        return sum(v["user_id"] == str(user) for v in values) >= count

    values = await reader.wait_for(arrived, timeout=30, what=f"{count} alerts of {user}")
    return [v for v in values if v["user_id"] == str(user)]


def expected_id(event: dict[str, Any]) -> str:
    e = event
    name = (
        f"alert:{e['tenant_id']}:{e['user_id']}:{e['bucket']}:{e['period_type']}:{e['period_start']}"
        f":{e['threshold_percent']}"
    )
    return str(uuid.uuid5(ID_NAMESPACE, name))


async def test_50_80_100_fire_once_each_in_order_with_the_contracts_ids(
    live: Live, alerts: TopicReader
) -> None:
    tenant, user = uuid.uuid4(), uuid.uuid4()
    first = await settle_turn(live, tenant, user, 400_001)  # 40 %: nothing
    second = await settle_turn(live, tenant, user, 149_999)  # 55 %: 50
    third = await settle_turn(live, tenant, user, 300_001)  # 85 %: 80
    fourth = await settle_turn(live, tenant, user, 200_001)  # 105 %: 100
    got = await alerts_of(alerts, user, 3)
    assert [(e["threshold_percent"], e["spent_credits_micro"], e["request_id"]) for e in got] == [
        (50, 550_000, second["request_id"]),
        (80, 850_001, third["request_id"]),
        (100, 1_050_002, fourth["request_id"]),
    ]
    for event in got:
        assert event["event_id"] == expected_id(event)
        assert (event["type"], event["schema_version"], event["bucket"], event["period_type"]) == (
            "quota.threshold_crossed", 1, "total", "daily",
        )  # fmt: skip
        assert event["limit_credits_micro"] == LIMIT and event["tenant_id"] == str(tenant)
    assert first["request_id"] not in {e["request_id"] for e in got}
    rows = await live.db.fetch(
        "SELECT threshold_percent, event_id FROM quota_alerts WHERE tenant_id = $1 AND user_id = $2"
        " ORDER BY threshold_percent",
        tenant,
        user,
    )
    assert [(r["threshold_percent"], str(r["event_id"])) for r in rows] == [
        (e["threshold_percent"], e["event_id"]) for e in got
    ]
    # nothing more: a later command (refused, the user is over the limit) is applied after them
    [refused] = await live.gateway.decide(live.gateway.requested(tenant, user, uuid.uuid4()))
    assert refused["decision"] == "reject"
    await wait_until(lambda: _published(live), timeout=30, what="the relay to publish everything")
    await alerts.poll()
    assert sum(v["user_id"] == str(user) for v in alerts.values()) == 3


async def test_a_settlement_jumping_from_40_to_100_percent_emits_50_80_100(
    live: Live, alerts: TopicReader
) -> None:
    tenant, user = uuid.uuid4(), uuid.uuid4()
    await settle_turn(live, tenant, user, 400_001)
    jump = await settle_turn(live, tenant, user, 600_001)
    got = await alerts_of(alerts, user, 3)
    assert [e["threshold_percent"] for e in got] == [50, 80, 100]
    assert {e["request_id"] for e in got} == {jump["request_id"]}
    assert {e["spent_credits_micro"] for e in got} == {1_000_002}


async def test_an_adjustment_that_crosses_emits(live: Live, alerts: TopicReader) -> None:
    tenant, user = uuid.uuid4(), uuid.uuid4()
    await settle_turn(live, tenant, user, 400_001)
    command = live.gateway.requested(tenant, user, uuid.uuid4())
    [decision] = await live.gateway.decide(command)
    assert decision["decision"] == "allow"
    # no usage: settles estimated after the grace, then late usage re-prices it
    await live.gateway.send_provider(live.gateway.provider("turn.completed", command, content="b"))
    await settled(live, command)
    await live.gateway.send_usage(live.gateway.usage(command, 4, out_tokens(500_001)))
    await settled(live, command, adjusted=True)
    got = await alerts_of(alerts, user, 2)
    assert [(e["threshold_percent"], e["request_id"]) for e in got] == [
        (50, command["request_id"]),
        (80, command["request_id"]),
    ]


async def test_a_tenant_override_applies(live: Live, alerts: TopicReader) -> None:
    user = uuid.uuid4()
    command = await settle_turn(live, OVERRIDDEN, user, 100_001)  # 25 % of the tenant's 400,000
    [event] = await alerts_of(alerts, user, 1)
    assert (event["threshold_percent"], event["limit_credits_micro"], event["request_id"]) == (
        25,
        400_000,
        command["request_id"],
    )


async def test_the_read_api_lists_the_thresholds_crossed(live: Live, alerts: TopicReader) -> None:
    tenant, user = uuid.uuid4(), uuid.uuid4()
    await settle_turn(live, tenant, user, 850_001)
    await alerts_of(alerts, user, 2)
    rows = await live.db.fetch(
        "SELECT bucket, period_type, array_agg(threshold_percent ORDER BY threshold_percent) AS t"
        " FROM quota_alerts WHERE tenant_id = $1 AND user_id = $2 GROUP BY 1, 2",
        tenant,
        user,
    )
    assert {(r["bucket"], r["period_type"]): list(r["t"]) for r in rows} == {("total", "daily"): [50, 80]}


async def test_a_replay_emits_nothing_and_rebuilds_the_same_alerts(live: Live, alerts: TopicReader) -> None:
    names = TopicNames(live.settings.topic_prefix)
    outputs = [names.quota_alerts, names.billing_usage]

    await wait_until(lambda: _published(live), timeout=30, what="the relay to publish everything")
    before_digest = await db_digest(live.settings.database_url)
    before_offsets = await end_offsets(live.settings, outputs)
    before_rows = await live.db.fetchval("SELECT count(*) FROM quota_alerts")
    assert before_rows >= 11

    await run_rebuild(live.settings, show_progress=False)

    assert await db_digest(live.settings.database_url) == before_digest
    assert await end_offsets(live.settings, outputs) == before_offsets
    assert await live.db.fetchval("SELECT count(*) FROM quota_alerts") == before_rows


async def _published(live: Live) -> bool:
    return bool(await live.db.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"))
