"""Completion and settlement through the real broker and database: docs/contract.md, "Settlement".

One worker with short watchdog timers (orphan 3 s, usage grace 2 s, tick 1 s) serves the module;
each test uses its own tenant, user and chat.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from minichat.domain.ids import message_id_for
from minichat.models.events import dedupe_key
from minichat.models.topics import TopicNames
from tests.conftest import Live, live_deployment
from tests.gateway import Event, policy_file
from tests.support import Endpoints, TopicReader, wait_until

pytestmark = pytest.mark.integration

# gpt-5-mini: 250_000 / 2_000_000 micro-credits per million tokens in / out.
MINI_IN, MINI_OUT = 250_000, 2_000_000
SMALL_USAGE = {"input_tokens": 5, "output_tokens": 6}


def credits(tokens_in: int, tokens_out: int, m_in: int = MINI_IN, m_out: int = MINI_OUT) -> int:
    return -(-tokens_in * m_in // 1_000_000) + -(-tokens_out * m_out // 1_000_000)


@pytest.fixture(scope="module")
async def fast(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    workdir = tmp_path_factory.mktemp("settlement")
    policy = policy_file(workdir, orphan_timeout_s=3, usage_grace_s=2, watchdog_interval_s=1)
    async with live_deployment(endpoints, template_database, workdir, policy=policy) as live:
        yield live


@pytest.fixture(scope="module")
async def billing(fast: Live) -> AsyncIterator[TopicReader]:
    topic = TopicNames(fast.settings.topic_prefix).billing_usage
    async with TopicReader(fast.settings.kafka_bootstrap_servers, topic) as reader:
        yield reader


async def start_turn(live: Live, **fields: Any) -> tuple[Event, dict[str, Any]]:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    command = live.gateway.requested(tenant, user, chat, **fields)
    [decision] = await live.gateway.decide(command)
    assert decision["decision"] in ("allow", "downgrade"), decision
    return command, decision


async def turn_row(live: Live, command: Event) -> Any:
    return await live.db.fetchrow(
        "SELECT * FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2 AND request_id = $3",
        uuid.UUID(command["tenant_id"]),
        uuid.UUID(command["chat_id"]),
        uuid.UUID(command.get("new_request_id", command["request_id"])),
    )


async def settled(live: Live, command: Event, *, timeout: float = 30) -> Any:
    async def check() -> Any:
        row = await turn_row(live, command)
        return row if row is not None and row["settled_at"] is not None else None

    return await wait_until(check, timeout=timeout, what="the turn to settle")


async def quota(live: Live, command: Event) -> dict[tuple[str, str], Any]:
    rows = await live.db.fetch(
        "SELECT * FROM quota_usage WHERE tenant_id = $1 AND user_id = $2",
        uuid.UUID(command["tenant_id"]),
        uuid.UUID(command["user_id"]),
    )
    return {(r["period_type"], r["bucket"]): r for r in rows}


async def billed(reader: TopicReader, turn: Any, *, kinds: int = 1) -> list[dict[str, Any]]:
    key = dedupe_key(turn["tenant_id"], turn["id"], turn["request_id"])
    keys = {key, f"{key}/adjusted"}

    def arrived(values: list[dict[str, Any]]) -> bool:
        return len({v["dedupe_key"] for v in values if v["dedupe_key"] in keys}) >= kinds

    values = await reader.wait_for(arrived, timeout=30, what=f"billing events of {key}")
    return [v for v in values if v["dedupe_key"] in keys]


def assert_reserve_released(rows: dict[tuple[str, str], Any], charge: int) -> None:
    assert rows, "the turn's quota rows exist"
    for row in rows.values():
        assert row["reserved_credits_micro"] == 0
        assert row["spent_credits_micro"] == charge
        assert row["calls"] == 1


async def test_completed_with_inline_usage_settles_actual(fast: Live, billing: TopicReader) -> None:
    command, decision = await start_turn(fast)
    usage = {"input_tokens": 120, "output_tokens": 340, "reasoning_tokens": 40}
    await fast.gateway.send_provider(
        fast.gateway.provider("turn.progress", command),
        fast.gateway.provider(
            "turn.completed", command, content="the answer", provider_response_id="resp-1", usage=usage
        ),
    )
    turn = await settled(fast, command)
    charge = credits(120, 340)
    assert (turn["state"], turn["billing_outcome"], turn["settlement_method"]) == (
        "completed",
        "completed",
        "actual",
    )
    assert (turn["committed_credits_micro"], turn["overshoot_capped"], turn["progress_seq"]) == (
        charge,
        False,
        1,
    )
    message = await fast.db.fetchrow(
        "SELECT * FROM messages WHERE id = $1",
        message_id_for(turn["chat_id"], turn["request_id"], "assistant"),
    )
    assert (message["content"], message["model"], message["input_tokens"], message["output_tokens"]) == (
        "the answer",
        decision["effective_model"],
        120,
        340,
    )
    assert turn["assistant_message_id"] == message["id"]
    rows = await quota(fast, command)
    assert_reserve_released(rows, charge)
    assert (rows[("daily", "total")]["input_tokens"], rows[("daily", "total")]["output_tokens"]) == (120, 340)

    [event] = await billed(billing, turn)
    assert event["type"] == "usage.settled"
    assert event["committed_credits_micro"] == charge
    assert event["reserved_credits_micro"] == decision["reserved_credits_micro"]
    assert event["usage"]["input_tokens"] == 120
    assert (event["period_daily"], event["terminal_state"]) == (str(turn["period_daily"]), "completed")


async def test_usage_after_terminal_and_before_terminal(fast: Live, billing: TopicReader) -> None:
    after, _ = await start_turn(fast)
    before, _ = await start_turn(fast)
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", after, content="a"))
    await fast.gateway.send_usage(fast.gateway.usage(after, 10, 20), fast.gateway.usage(before, 30, 40))
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", before, content="b"))
    for command, (tin, tout) in ((after, (10, 20)), (before, (30, 40))):
        turn = await settled(fast, command)
        assert (turn["settlement_method"], turn["committed_credits_micro"]) == ("actual", credits(tin, tout))
        assert (turn["input_tokens"], turn["output_tokens"], turn["usage_known"]) == (tin, tout, True)
        [event] = await billed(billing, turn)
        assert event["settlement_method"] == "actual"


async def test_completed_without_usage_settles_estimated_after_grace(fast: Live) -> None:
    command, decision = await start_turn(fast)
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", command, content="x"))
    turn = await settled(fast, command)
    estimated_in = decision["reserve_tokens"] - decision["max_output_tokens"]
    assert (turn["settlement_method"], turn["billing_outcome"]) == ("estimated", "completed")
    assert turn["committed_credits_micro"] == credits(estimated_in, 50)  # minimal_generation_floor
    # the watchdog wrote usage.grace_expired (it marks the turn once the broker acked the event,
    # which may be after the usage agent already applied it)
    await wait_until(
        lambda: fast.db.fetchval(
            "SELECT grace_sent_at IS NOT NULL FROM chat_turns WHERE id = $1", turn["id"]
        ),
        timeout=30,
        what="the watchdog's mark",
    )
    assert_reserve_released(await quota(fast, command), turn["committed_credits_micro"])


@pytest.mark.parametrize(
    ("terminal", "fields", "outcome", "method"),
    [
        ("turn.cancelled", {"content": "partial", "usage": SMALL_USAGE}, "aborted", "actual"),
        ("turn.failed", {"error_code": "provider_error", "usage": SMALL_USAGE}, "failed", "actual"),
        ("turn.failed", {"error_code": "context_length_exceeded"}, "failed", "released"),
        ("turn.failed", {"error_code": "provider_not_called"}, "failed", "released"),
        ("turn.failed", {"error_code": "something_new"}, "failed", "estimated"),
        ("turn.cancelled", {"content": ""}, "aborted", "estimated"),
        ("turn.failed", {"error_code": "rate_limited"}, "failed", "estimated"),
    ],
    ids=[
        "cancelled-usage",
        "provider_error-usage",
        "context_length",
        "not_called",
        "unknown-code",
        "cancelled-empty-no-usage",
        "rate_limited-no-usage",
    ],
)  # fmt: skip
async def test_settlement_table(
    fast: Live, billing: TopicReader, terminal: str, fields: dict[str, Any], outcome: str, method: str
) -> None:
    command, decision = await start_turn(fast)
    await fast.gateway.send_provider(fast.gateway.provider(terminal, command, **fields))
    turn = await settled(fast, command)
    assert (turn["billing_outcome"], turn["settlement_method"]) == (outcome, method)
    expected = {
        "actual": credits(5, 6),
        "released": 0,
        "estimated": credits(decision["reserve_tokens"] - decision["max_output_tokens"], 50),
    }[method]
    assert turn["committed_credits_micro"] == expected
    assert_reserve_released(await quota(fast, command), expected)
    messages = await fast.db.fetch(
        "SELECT content FROM messages WHERE chat_id = $1 AND role = 'assistant'", turn["chat_id"]
    )
    assert [m["content"] for m in messages] == (["partial"] if fields.get("content") else [])
    [event] = await billed(billing, turn)
    assert (event["billing_outcome"], event["settlement_method"], event["committed_credits_micro"]) == (
        outcome,
        method,
        expected,
    )


async def test_orphaned_turn_is_aborted_and_estimated(fast: Live) -> None:
    command, _decision = await start_turn(fast)
    await fast.gateway.send_provider(fast.gateway.provider("turn.progress", command))
    turn = await settled(fast, command)
    assert (turn["state"], turn["error_code"]) == ("failed", "orphan_timeout")
    assert (turn["billing_outcome"], turn["settlement_method"]) == ("aborted", "estimated")
    assert turn["progress_seq"] == 1
    # a provider result after the orphan changes nothing
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", command, content="too late"))
    marker = await start_turn(fast)  # a later command on the same worker, processed after it
    await settled(fast, marker[0])
    again = await turn_row(fast, command)
    assert (again["state"], again["committed_credits_micro"]) == ("failed", turn["committed_credits_micro"])


async def test_overshoot_boundary(fast: Live) -> None:
    # 20 bytes: ceil((5 + 100) x 1.10) = 116 input tokens + 16_384 output = a reserve of 16_500
    at_limit, decision = await start_turn(fast, content="x" * 20)
    over, _ = await start_turn(fast, content="x" * 20)
    reserve = decision["reserve_tokens"]
    assert reserve == 16_500
    edge = reserve * 11 // 10  # exactly reserve x 1.10: not over the tolerance
    usage_at = {"input_tokens": edge - 1000, "output_tokens": 1000}
    usage_over = {"input_tokens": edge - 999, "output_tokens": 1000}
    await fast.gateway.send_provider(
        fast.gateway.provider("turn.completed", at_limit, content="a", usage=usage_at),
        fast.gateway.provider("turn.completed", over, content="b", usage=usage_over),
    )
    first = await settled(fast, at_limit)
    second = await settled(fast, over)
    assert (first["overshoot_capped"], first["committed_credits_micro"]) == (
        False,
        credits(edge - 1000, 1000),
    )
    assert (second["overshoot_capped"], second["committed_credits_micro"]) == (
        True,
        second["reserved_credits_micro"],
    )


async def test_duplicates_change_nothing(fast: Live, billing: TopicReader) -> None:
    command, _ = await start_turn(fast)
    done = fast.gateway.provider(
        "turn.completed", command, content="once", usage={"input_tokens": 1, "output_tokens": 2}
    )
    await fast.gateway.send_provider(
        done, done, fast.gateway.provider("turn.failed", command, error_code="provider_error")
    )
    await fast.gateway.send_usage(fast.gateway.usage(command, 999, 999), fast.gateway.usage(command, 1, 2))
    turn = await settled(fast, command)
    marker, _ = await start_turn(fast)
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", marker, content="m"))
    await fast.gateway.send_usage(fast.gateway.usage(marker, 1, 1))
    await settled(fast, marker)
    turn = await turn_row(fast, command)
    assert (turn["state"], turn["input_tokens"], turn["committed_credits_micro"]) == (
        "completed",
        1,
        credits(1, 2),
    )
    assert_reserve_released(await quota(fast, command), credits(1, 2))
    events = await billed(billing, turn)
    assert {e["dedupe_key"] for e in events} == {
        dedupe_key(turn["tenant_id"], turn["id"], turn["request_id"])
    }


async def test_events_before_their_command_are_parked_then_applied(fast: Live, billing: TopicReader) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    command = fast.gateway.requested(tenant, user, chat)
    await fast.gateway.send_usage(fast.gateway.usage(command, 7, 8))
    await fast.gateway.send_provider(
        fast.gateway.provider("turn.progress", command),
        fast.gateway.provider("turn.completed", command, content="early"),
    )

    async def parked() -> bool:
        count = await fast.db.fetchval("SELECT count(*) FROM parked_events WHERE chat_id = $1", chat)
        return count == 3

    await wait_until(parked, timeout=30, what="three parked events")
    [decision] = await fast.gateway.decide(command)
    assert decision["decision"] == "allow"
    turn = await settled(fast, command)
    assert (turn["state"], turn["progress_seq"], turn["settlement_method"]) == ("completed", 1, "actual")
    assert turn["committed_credits_micro"] == credits(7, 8)
    assert await fast.db.fetchval("SELECT count(*) FROM parked_events WHERE chat_id = $1", chat) == 0
    await billed(billing, turn)


async def test_events_of_a_rejected_request_are_dropped(fast: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first = fast.gateway.requested(tenant, user, chat)
    second = fast.gateway.requested(tenant, user, chat)  # rejected: the first is running
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", second, content="parked"))
    await wait_until(
        lambda: fast.db.fetchval("SELECT count(*) = 1 FROM parked_events WHERE chat_id = $1", chat),
        timeout=30,
        what="the parked event",
    )
    a, b = await fast.gateway.decide(first, second)
    assert (a["decision"], b["error_code"]) == ("allow", "generation_in_progress")
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", second, content="after"))
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", first, content="first"))
    await settled(fast, first)
    assert await fast.db.fetchval("SELECT count(*) FROM parked_events WHERE chat_id = $1", chat) == 0
    assert await fast.db.fetchval("SELECT count(*) FROM chat_turns WHERE chat_id = $1", chat) == 1


async def test_late_usage_reprices_an_estimated_settlement(fast: Live, billing: TopicReader) -> None:
    command, _decision = await start_turn(fast)
    await fast.gateway.send_provider(fast.gateway.provider("turn.completed", command, content="x"))
    estimated = await settled(fast, command)
    assert estimated["settlement_method"] == "estimated"
    await fast.gateway.send_usage(fast.gateway.usage(command, 100, 200))

    async def adjusted() -> Any:
        row = await turn_row(fast, command)
        return row if row["adjusted_at"] is not None else None

    turn = await wait_until(adjusted, timeout=30, what="the adjustment")
    assert (turn["settlement_method"], turn["committed_credits_micro"]) == ("actual", credits(100, 200))
    rows = await quota(fast, command)
    assert_reserve_released(rows, credits(100, 200))
    events = await billed(billing, turn, kinds=2)
    by_type = {e["type"]: e for e in events}
    assert by_type["usage.settled"]["committed_credits_micro"] == estimated["committed_credits_micro"]
    adjusted_event = by_type["usage.adjusted"]
    assert adjusted_event["dedupe_key"].endswith("/adjusted")
    assert adjusted_event["previous_committed_credits_micro"] == estimated["committed_credits_micro"]
    assert adjusted_event["committed_credits_micro"] == credits(100, 200)


async def test_tenant_mismatch_is_dead_lettered(fast: Live) -> None:
    command, _ = await start_turn(fast)
    forged = fast.gateway.provider("turn.completed", command, content="secret text")
    forged["tenant_id"] = str(uuid.uuid4())
    await fast.gateway.send_provider(forged)
    topic = TopicNames(fast.settings.topic_prefix).dead_letters
    async with TopicReader(fast.settings.kafka_bootstrap_servers, topic) as reader:
        letters = await reader.wait_for(
            lambda vs: any(
                v["error_code"] == "tenant_mismatch" and forged["event_id"] in v["payload"] for v in vs
            ),
            timeout=30,
        )
    letter = next(v for v in letters if forged["event_id"] in v["payload"])
    assert "secret text" not in letter["error_detail"]
    turn = await turn_row(fast, command)
    assert turn["state"] == "running"


async def test_settlement_uses_the_stored_periods_not_the_clock(fast: Live) -> None:
    """A turn admitted at 23:59:59 UTC settles on that day's rows, whenever it finishes."""
    command, _decision = await start_turn(fast)
    turn = await turn_row(fast, command)
    day = turn["period_daily"]
    yesterday = day.fromordinal(day.toordinal() - 1)
    month = yesterday.replace(day=1)
    # Move the admission to the previous day, as if its record had been stamped before midnight.
    async with fast.db.acquire() as con, con.transaction():
        await con.execute(
            "UPDATE chat_turns SET period_daily = $2, period_monthly = $3 WHERE id = $1",
            turn["id"],
            yesterday,
            month,
        )
        await con.execute(
            "UPDATE quota_usage SET period_start = $3"
            " WHERE tenant_id = $1 AND user_id = $2 AND period_type = 'daily'",
            turn["tenant_id"],
            turn["requester_user_id"],
            yesterday,
        )
        await con.execute(
            "UPDATE quota_usage SET period_start = $3"
            " WHERE tenant_id = $1 AND user_id = $2 AND period_type = 'monthly'",
            turn["tenant_id"],
            turn["requester_user_id"],
            month,
        )
    await fast.gateway.send_provider(
        fast.gateway.provider(
            "turn.completed", command, content="z", usage={"input_tokens": 3, "output_tokens": 4}
        )
    )
    done = await settled(fast, command)
    rows = await quota(fast, command)
    assert {(k, r["period_start"]) for k, r in rows.items()} == {
        (("daily", "total"), yesterday),
        (("monthly", "total"), month),
    }
    assert_reserve_released(rows, done["committed_credits_micro"])
