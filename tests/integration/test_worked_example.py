"""The worked quota example (b22-b26 in docs/behaviours.md), end to end
through Kafka and Postgres at the contract's scale (divisor 1,000,000: the specification's
multipliers are taken x1000 so its micro-credit figures hold).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from minichat.domain.ids import quota_row_id
from minichat.domain.quota import BucketKey
from tests.conftest import Live, live_deployment
from tests.gateway import policy_file
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration

MODELS = [
    {
        "id": "premium-p",
        "tier": "premium",
        "enabled": True,
        "default": True,
        "input_tokens_credit_multiplier_micro": 2_500_000_000,
        "output_tokens_credit_multiplier_micro": 2_500_000_000,
        "max_output_tokens": 500,
        "max_input_tokens": 400_000,
        "web_search": False,
        "code_interpreter": False,
    },
    {
        "id": "standard-s",
        "tier": "standard",
        "enabled": True,
        "default": True,
        "input_tokens_credit_multiplier_micro": 1_000_000_000,
        "output_tokens_credit_multiplier_micro": 1_000_000_000,
        "max_output_tokens": 500,
        "max_input_tokens": 400_000,
        "web_search": False,
        "code_interpreter": False,
    },
]

# Spent before the example starts: tier:premium daily 20M / monthly 200M, total 25M / 240M.
SEEDED = {("daily", "tier:premium"): 20_000_000, ("monthly", "tier:premium"): 200_000_000,
          ("daily", "total"): 25_000_000, ("monthly", "total"): 240_000_000}  # fmt: skip


@pytest.fixture(scope="module")
async def example(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    workdir = tmp_path_factory.mktemp("worked")
    policy = policy_file(
        workdir,
        models=MODELS,
        limits={"premium": {"daily": 22_000_000, "monthly": 300_000_000},
                "standard": {"daily": 60_000_000, "monthly": 600_000_000}},
        estimation={"bytes_per_token": 1, "fixed_overhead_tokens": 0, "safety_margin_pct": 0},
        max_output_tokens_cap=500,
    )  # fmt: skip
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as live:
        yield live


async def seed(live: Live, tenant: uuid.UUID, user: uuid.UUID) -> None:
    """The spent figures on every period row the request may fall into (today or, near midnight,
    tomorrow: the record timestamp decides)."""
    today = datetime.now(UTC).date()
    rows: list[tuple[Any, ...]] = []
    for day in (today, today + timedelta(days=1)):
        for (period_type, bucket), spent in SEEDED.items():
            start = day if period_type == "daily" else day.replace(day=1)
            key = BucketKey(period_type, start, bucket)  # type: ignore[arg-type]
            rows.append((quota_row_id(tenant, user, key), tenant, user, period_type, start, bucket, spent))
    await live.db.executemany(
        "INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket,"
        " spent_credits_micro, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now())"
        " ON CONFLICT DO NOTHING",
        rows,
    )


async def rows_of(live: Live, tenant: uuid.UUID, user: uuid.UUID, day: date) -> dict[tuple[str, str], Any]:
    rows = await live.db.fetch(
        "SELECT * FROM quota_usage WHERE tenant_id = $1 AND user_id = $2 AND period_start IN ($3, $4)",
        tenant,
        user,
        day,
        day.replace(day=1),
    )
    return {
        (r["period_type"], r["bucket"]): r
        for r in rows
        if r["period_type"] == "monthly" or r["period_start"] == day
    }


async def settle_turn(live: Live, command: dict[str, Any], tokens_in: int, tokens_out: int) -> Any:
    usage = {"input_tokens": tokens_in, "output_tokens": tokens_out}
    await live.gateway.send_provider(
        live.gateway.provider("turn.completed", command, content="ok", usage=usage)
    )

    async def done() -> Any:
        return await live.db.fetchrow(
            "SELECT * FROM chat_turns WHERE chat_id = $1 AND settled_at IS NOT NULL",
            uuid.UUID(command["chat_id"]),
        )

    return await wait_until(done, timeout=30, what="settlement")


async def test_items_22_to_25_premium_unavailable_downgrade_and_settle(example: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await seed(example, tenant, user)
    command = example.gateway.requested(tenant, user, chat, content="a" * 1000, model="premium-p")
    [decision] = await example.gateway.decide(command)

    # 22-23: on premium the reserve would be 2_500_000 + 1_250_000 = 3_750_000, and the daily
    # tier:premium row would reach 23_750_000 > 22_000_000 although monthly passes.
    # 24: so the turn downgrades to S with a reserve of 1_000_000 + 500_000 on both total rows.
    assert (decision["decision"], decision["effective_model"], decision["downgrade_reason"]) == (
        "downgrade",
        "standard-s",
        "premium_quota_exhausted",
    )
    assert (decision["reserved_credits_micro"], decision["reserve_tokens"]) == (1_500_000, 1_500)
    day = date.fromisoformat(decision["decided_at"][:10])
    rows = await rows_of(example, tenant, user, day)
    assert rows[("daily", "total")]["reserved_credits_micro"] == 1_500_000
    assert rows[("monthly", "total")]["reserved_credits_micro"] == 1_500_000
    assert rows[("daily", "total")]["spent_credits_micro"] + 1_500_000 == 26_500_000
    assert rows[("monthly", "total")]["spent_credits_micro"] + 1_500_000 == 241_500_000
    assert rows[("daily", "tier:premium")]["reserved_credits_micro"] == 0  # untouched

    # 25: S reported 900 in / 300 out: actual 1_200_000; 300_000 returns to the budget.
    turn = await settle_turn(example, command, 900, 300)
    assert (turn["settlement_method"], turn["committed_credits_micro"]) == ("actual", 1_200_000)
    rows = await rows_of(example, tenant, user, day)
    assert (
        rows[("daily", "total")]["spent_credits_micro"],
        rows[("monthly", "total")]["spent_credits_micro"],
    ) == (
        26_200_000,
        241_200_000,
    )
    for key in (("daily", "total"), ("monthly", "total")):
        assert rows[key]["reserved_credits_micro"] == 0
        assert (rows[key]["calls"], rows[key]["input_tokens"], rows[key]["output_tokens"]) == (1, 900, 300)
    assert rows[("daily", "tier:premium")]["spent_credits_micro"] == 20_000_000


async def test_item_26_using_exactly_the_reserve(example: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    command = example.gateway.requested(tenant, user, chat, content="b" * 1000, model="standard-s")
    [decision] = await example.gateway.decide(command)
    assert (decision["decision"], decision["reserved_credits_micro"]) == ("allow", 1_500_000)
    turn = await settle_turn(example, command, 1000, 500)
    assert (turn["committed_credits_micro"], turn["overshoot_capped"]) == (1_500_000, False)
    day = date.fromisoformat(decision["decided_at"][:10])
    rows = await rows_of(example, tenant, user, day)
    assert {(r["spent_credits_micro"], r["reserved_credits_micro"]) for r in rows.values()} == {
        (1_500_000, 0)
    }
