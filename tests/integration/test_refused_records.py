"""No record whose content PostgreSQL refuses can stop the worker (issue 10, item 1).

A worker that exits on such a record meets it again on restart, and so does every worker that
takes its partition over: one user stops every tenant. Now the record is isolated from its batch,
dead-lettered `unprocessable` (what was refused, never the content), and the rest is applied.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from minichat.models.events import MAX_TOKEN_COUNT
from minichat.models.topics import TopicNames
from tests.conftest import Live, live_deployment
from tests.gateway import Event
from tests.support import Endpoints, TopicReader, wait_until

pytestmark = pytest.mark.integration

INT32_MAX = 2**31 - 1


async def settled_count(live: Live, tenant: uuid.UUID) -> int:
    count: int = await live.db.fetchval(
        "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND settled_at IS NOT NULL", tenant
    )
    return count


async def other_tenant_is_served(live: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [decision] = await live.gateway.decide(live.gateway.requested(tenant, user, chat))
    assert decision["decision"] == "allow", decision


async def test_tool_calls_summing_past_int32_in_a_month_are_counted(
    endpoints: Endpoints, template_database: str, tmp_path: Any
) -> None:
    """About 215 reports at the maximum overflowed an `integer` quota counter: the worker exited
    (status 70) and took every tenant down with it. 250 such reports of one user now add up."""
    turns = 250
    async with live_deployment(endpoints, template_database, tmp_path) as live:
        gw = live.gateway
        tenant, user = uuid.uuid4(), uuid.uuid4()
        commands = [gw.requested(tenant, user, uuid.uuid4()) for _ in range(turns)]
        decisions = await gw.decide(*commands, timeout=120)
        assert {d["decision"] for d in decisions} == {"allow"}
        await gw.send_provider(*(gw.provider("turn.completed", c, content="done") for c in commands))
        maximal = {"web_search_calls": MAX_TOKEN_COUNT, "code_interpreter_calls": MAX_TOKEN_COUNT}
        await gw.send_usage(*(gw.usage(c, 1, 1, **maximal) for c in commands))

        async def all_settled() -> bool:
            assert all(w.proc.poll() is None for w in live.workers), live.logs()[-3000:]
            return await settled_count(live, tenant) == turns

        await wait_until(all_settled, timeout=120, what=f"{turns} turns to settle")
        rows = await live.db.fetch(
            "SELECT period_type, web_search_calls, code_interpreter_calls, calls FROM quota_usage "
            "WHERE tenant_id = $1 AND user_id = $2 AND bucket = 'total'",
            tenant,
            user,
        )
        assert len(rows) == 2  # today and this month
        for row in rows:
            assert row["web_search_calls"] == row["code_interpreter_calls"] == turns * MAX_TOKEN_COUNT
            assert row["web_search_calls"] > INT32_MAX
            assert row["calls"] == turns
        await other_tenant_is_served(live)
        assert "refused by PostgreSQL" not in live.logs()


@pytest.mark.parametrize(
    "env",
    [{}, {"MINICHAT_APPLY_PARALLEL": "3", "MINICHAT_APPLY_PARALLEL_MIN": "2"}],
    ids=["one-transaction", "split-into-concurrent-groups"],
)
async def test_a_record_postgres_refuses_is_dead_lettered_alone_and_the_rest_applied(
    endpoints: Endpoints, template_database: str, tmp_path: Any, env: dict[str, str]
) -> None:
    """Whatever makes PostgreSQL refuse a record (here a constraint an operator added), the record
    is found in its batch, dead-lettered `unprocessable` with the constraint's name and without its
    content, counted, and the records before and after it in the same batch are applied. (Split: the
    refused record fails its group while the others commit; the batch is then isolated as one.)"""
    marker = f"refuse-me-{uuid.uuid4().hex}"
    async with live_deployment(endpoints, template_database, tmp_path, env=env) as live:
        await live.db.execute(
            f"ALTER TABLE messages ADD CONSTRAINT no_refused_content CHECK (content NOT LIKE '{marker}%')"
        )
        gw = live.gateway
        tenant, user, chat_of_bad = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        # One partition, one burst: the refused request sits in the middle of one batch.
        chats = [uuid.uuid4() for _ in range(40)]
        # Half the chats are the user's, half each of its own user: groups a split can apply apart.
        owners = {chat: user if i % 2 else uuid.uuid4() for i, chat in enumerate(chats)}
        commands: list[Event] = [gw.requested(tenant, owners[chat], chat) for chat in chats[:20]]
        bad = gw.requested(tenant, user, chat_of_bad, content=f"{marker} secret words")
        commands += [bad] + [gw.requested(tenant, owners[chat], chat) for chat in chats[20:]]
        names = TopicNames(live.settings.topic_prefix)
        async with TopicReader(live.settings.kafka_bootstrap_servers, names.dead_letters) as letters:
            await gw.send(*commands)
            good = [c for c in commands if c is not bad]
            decisions = await gw.answers(good, timeout=120)
            assert {d["decision"] for d in decisions} == {"allow"}
            [letter] = await letters.wait_for(
                lambda values: len(values) >= 1, timeout=60, what="a dead letter"
            )
        assert letter["error_code"] == "unprocessable"
        assert "no_refused_content" in letter["error_detail"] and "CheckViolation" in letter["error_detail"]
        assert marker not in letter["error_detail"]
        assert json.loads(letter["payload"])["event_id"] == bad["event_id"]
        assert all(w.proc.poll() is None for w in live.workers)
        stored = await live.db.fetchval(
            "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2", tenant, chat_of_bad
        )
        assert stored == 0, "nothing of the refused record is stored"
        assert not any(d["command_event_id"] == bad["event_id"] for d in live.gateway.decisions.values())
        await other_tenant_is_served(live)

        async def logged() -> bool:
            return "refused by PostgreSQL" in live.logs()

        await wait_until(logged, timeout=10, what="the refusal in the log")
        assert marker not in live.logs() and "secret words" not in live.logs()


async def test_every_integer_field_at_its_maximum_is_applied_or_refused_with_a_reason(
    endpoints: Endpoints, template_database: str, tmp_path: Any
) -> None:
    """The hostile corpus' numeric extremes: each integer field of the input events at the largest
    value its model accepts. None stops the worker; each is applied exactly or refused with a
    decision code."""
    async with live_deployment(endpoints, template_database, tmp_path) as live:
        gw = live.gateway
        tenant, user = uuid.uuid4(), uuid.uuid4()
        [images] = await gw.decide(gw.requested(tenant, user, uuid.uuid4(), image_count=2**31 - 1))
        assert (images["decision"], images["error_code"]) in {
            ("reject", "too_many_images"),
            ("reject", "images_disabled"),
        }
        command = gw.requested(tenant, user, uuid.uuid4())
        [allowed] = await gw.decide(command)
        assert allowed["decision"] == "allow"
        await gw.send_provider(gw.provider("turn.orphaned", command, progress_seq=2**63 - 1))
        counts = (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_write_input_tokens",
            "reasoning_tokens",
            "web_search_calls",
            "code_interpreter_calls",
        )
        maximal = dict.fromkeys(counts, MAX_TOKEN_COUNT)
        await gw.send_provider(gw.provider("turn.completed", command, content="done", usage=maximal))

        async def settled() -> Any:
            assert all(w.proc.poll() is None for w in live.workers), live.logs()[-3000:]
            return await live.db.fetchrow(
                "SELECT * FROM chat_turns"
                " WHERE tenant_id = $1 AND request_id = $2 AND settled_at IS NOT NULL",
                tenant,
                uuid.UUID(command["request_id"]),
            )

        turn = await wait_until(settled, timeout=60, what="the maximal turn to settle")
        assert turn["state"] == "completed", "the orphan signal with a foreign progress_seq changed nothing"
        assert {c: turn[c] for c in counts} == maximal
        assert turn["overshoot_capped"] is True
        rows = await live.db.fetch(
            "SELECT input_tokens, output_tokens, web_search_calls FROM quota_usage"
            " WHERE tenant_id = $1 AND user_id = $2 AND bucket = 'total'",
            tenant,
            user,
        )
        assert [tuple(r) for r in rows] == [(MAX_TOKEN_COUNT,) * 3] * 2
        await other_tenant_is_served(live)
        assert "refused by PostgreSQL" not in live.logs()
