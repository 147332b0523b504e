"""Admission through the real broker and database: docs/contract.md, "Admission", rules 1-8."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import pytest

from minichat.domain.ids import message_id_for, turn_id_for
from tests.conftest import Live
from tests.support import wait_until

pytestmark = pytest.mark.integration


def ids() -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    return uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


async def quota_rows(live: Live, tenant: uuid.UUID, user: uuid.UUID) -> dict[tuple[str, str], Any]:
    rows = await live.db.fetch(
        "SELECT * FROM quota_usage WHERE tenant_id = $1 AND user_id = $2", tenant, user
    )
    return {(r["period_type"], r["bucket"]): r for r in rows}


async def test_new_chat_is_allowed_and_stored(live: Live) -> None:
    tenant, user, chat = ids()
    command = live.gateway.requested(tenant, user, chat, content="hi there", model="gpt-5-mini", title="T")
    [decision] = await live.gateway.decide(command)

    request_id = uuid.UUID(command["request_id"])
    assert decision["decision"] == "allow"
    assert decision["replay"] is False
    assert decision["turn_id"] == str(turn_id_for(chat, request_id))
    assert decision["effective_model"] == decision["selected_model"] == "gpt-5-mini"
    assert decision["reserved_credits_micro"] > 0

    chat_row = await live.db.fetchrow("SELECT * FROM chats WHERE tenant_id = $1 AND id = $2", tenant, chat)
    assert (chat_row["user_id"], chat_row["model"], chat_row["title"]) == (user, "gpt-5-mini", "T")
    turn = await live.db.fetchrow(
        "SELECT * FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2", tenant, chat
    )
    assert turn["state"] == "running"
    assert turn["id"] == turn_id_for(chat, request_id)
    assert turn["reserved_credits_micro"] == decision["reserved_credits_micro"]
    assert turn["reserve_tokens"] == decision["reserve_tokens"]
    assert turn["max_output_tokens_applied"] == decision["max_output_tokens"]
    assert turn["started_at"].isoformat().replace("+00:00", "Z")[:19] == decision["decided_at"][:19]
    decided_day = date.fromisoformat(decision["decided_at"][:10])
    assert (turn["period_daily"], turn["period_monthly"]) == (decided_day, decided_day.replace(day=1))
    message = await live.db.fetchrow(
        "SELECT * FROM messages WHERE tenant_id = $1 AND chat_id = $2", tenant, chat
    )
    assert message["id"] == message_id_for(chat, request_id, "user")
    assert (message["role"], message["content"]) == ("user", "hi there")

    rows = await quota_rows(live, tenant, user)
    assert set(rows) == {("daily", "total"), ("monthly", "total")}  # standard turn: no premium rows
    for row in rows.values():
        assert row["reserved_credits_micro"] == decision["reserved_credits_micro"]
        assert row["spent_credits_micro"] == 0


async def test_duplicate_command_replays_without_a_second_reserve(live: Live) -> None:
    tenant, user, chat = ids()
    command = live.gateway.requested(tenant, user, chat)
    [first] = await live.gateway.decide(command)
    await live.gateway.send(command, command)
    answers = await live.gateway.answers([command], copies=3)

    assert [a["replay"] for a in answers] == [False, True, True]
    assert all({**a, "replay": False} == first for a in answers)
    rows = await quota_rows(live, tenant, user)
    assert rows[("daily", "total")]["reserved_credits_micro"] == first["reserved_credits_micro"]
    turns = await live.db.fetchval("SELECT count(*) FROM chat_turns WHERE tenant_id = $1", tenant)
    assert turns == 1


async def test_generation_in_progress(live: Live) -> None:
    tenant, user, chat = ids()
    first = live.gateway.requested(tenant, user, chat)
    second = live.gateway.requested(tenant, user, chat)
    a, b = await live.gateway.decide(first, second)
    assert a["decision"] == "allow"
    assert (b["decision"], b["error_code"], b["turn_id"]) == ("reject", "generation_in_progress", None)
    # a rejection stores only the decision
    rows = await quota_rows(live, tenant, user)
    assert rows[("daily", "total")]["reserved_credits_micro"] == a["reserved_credits_micro"]
    assert await live.db.fetchval("SELECT count(*) FROM messages WHERE tenant_id = $1", tenant) == 1
    stored = await live.db.fetchval(
        "SELECT count(*) FROM turn_decisions WHERE tenant_id = $1 AND chat_id = $2", tenant, chat
    )
    assert stored == 2


@pytest.mark.parametrize("intruder", ["other_tenant", "other_owner"])
async def test_someone_elses_chat_is_not_found(live: Live, intruder: str) -> None:
    tenant, user, chat = ids()
    [owner] = await live.gateway.decide(live.gateway.requested(tenant, user, chat, content="mine"))
    before = await live.db.fetch("SELECT * FROM chat_turns WHERE chat_id = $1 ORDER BY id", chat)

    other_tenant = uuid.uuid4() if intruder == "other_tenant" else tenant
    other_user = uuid.uuid4()
    attempt = live.gateway.requested(other_tenant, other_user, chat, content="theirs", model="gpt-5.2")
    [decision] = await live.gateway.decide(attempt)

    assert owner["decision"] == "allow"
    assert (decision["decision"], decision["error_code"]) == ("reject", "chat_not_found")
    assert decision["selected_model"] == "gpt-5.2"  # echoes the caller, reveals nothing of the chat
    assert await live.db.fetch("SELECT * FROM chat_turns WHERE chat_id = $1 ORDER BY id", chat) == before
    contents = await live.db.fetch("SELECT content FROM messages WHERE chat_id = $1", chat)
    assert [r["content"] for r in contents] == ["mine"]
    assert await quota_rows(live, other_tenant, other_user) == {}


async def test_deleted_chat_is_not_found_and_delete_is_done(live: Live) -> None:
    tenant, user, chat = ids()
    create = live.gateway.requested(tenant, user, chat)
    delete = live.gateway.delete_chat(tenant, user, chat)
    after = live.gateway.requested(tenant, user, chat)
    created, deleted, rejected = await live.gateway.decide(create, delete, after)
    assert created["decision"] == "allow"
    assert (deleted["decision"], deleted["request_id"], deleted["command"]) == ("done", None, "chat.delete")
    assert (rejected["decision"], rejected["error_code"]) == ("reject", "chat_not_found")
    chat_row = await live.db.fetchrow("SELECT deleted_at FROM chats WHERE id = $1", chat)
    assert chat_row["deleted_at"] is not None
    # the running turn of a deleted chat is untouched: it still finishes and settles
    turn = await live.db.fetchrow("SELECT state, deleted_at FROM chat_turns WHERE chat_id = $1", chat)
    assert (turn["state"], turn["deleted_at"]) == ("running", None)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"image_count": 5}, "too_many_images"),
        ({"content": "x" * 600_000, "model": "gpt-5-nano"}, "input_too_long"),
    ],
    ids=["too_many_images", "input_too_long"],
)
async def test_request_shape_rejections(live: Live, fields: dict[str, Any], code: str) -> None:
    tenant, user, chat = ids()
    [decision] = await live.gateway.decide(live.gateway.requested(tenant, user, chat, **fields))
    assert (decision["decision"], decision["error_code"]) == ("reject", code)
    assert await live.db.fetchval("SELECT count(*) FROM chats WHERE id = $1", chat) == 0
    assert await quota_rows(live, tenant, user) == {}


async def test_new_chat_without_model_is_rejected(live: Live) -> None:
    tenant, user, chat = ids()
    [decision] = await live.gateway.decide(live.gateway.requested(tenant, user, chat, model=None))
    assert (decision["decision"], decision["error_code"]) == ("reject", "model_required")


async def test_premium_model_reserves_both_buckets(live: Live) -> None:
    tenant, user, chat = ids()
    [decision] = await live.gateway.decide(live.gateway.requested(tenant, user, chat, model="gpt-5.2"))
    assert (decision["decision"], decision["effective_model"]) == ("allow", "gpt-5.2")
    rows = await quota_rows(live, tenant, user)
    assert set(rows) == {(p, b) for p in ("daily", "monthly") for b in ("total", "tier:premium")}
    assert {r["reserved_credits_micro"] for r in rows.values()} == {decision["reserved_credits_micro"]}


async def _finished_turn(
    live: Live, tenant: uuid.UUID, user: uuid.UUID, chat: uuid.UUID, content: str
) -> Any:
    command = live.gateway.requested(tenant, user, chat, content=content)
    [decision] = await live.gateway.decide(command)
    assert decision["decision"] == "allow"
    usage = {"input_tokens": 10, "output_tokens": 20}
    await live.gateway.send_provider(
        live.gateway.provider("turn.completed", command, content="answer", usage=usage)
    )

    async def settled() -> Any:
        return await live.db.fetchval(
            "SELECT settled_at IS NOT NULL FROM chat_turns WHERE chat_id = $1 AND request_id = $2",
            chat,
            uuid.UUID(command["request_id"]),
        )

    await wait_until(settled, timeout=30, what="the turn to settle")
    return command


async def test_retry_and_edit_replace_the_latest_terminal_turn(live: Live) -> None:
    tenant, user, chat = ids()
    first = await _finished_turn(live, tenant, user, chat, "original question")
    retry = live.gateway.retry(tenant, user, chat, first["request_id"])
    [retried] = await live.gateway.decide(retry)
    assert (retried["decision"], retried["command"], retried["request_id"]) == (
        "allow",
        "turn.retry",
        retry["new_request_id"],
    )
    old = await live.db.fetchrow(
        "SELECT * FROM chat_turns WHERE chat_id = $1 AND request_id = $2",
        chat,
        uuid.UUID(first["request_id"]),
    )
    assert old["deleted_at"] is not None
    assert old["replaced_by_request_id"] == uuid.UUID(retry["new_request_id"])
    live_messages = await live.db.fetch(
        "SELECT request_id, role, content FROM messages WHERE chat_id = $1 AND deleted_at IS NULL", chat
    )
    assert [(m["request_id"], m["role"], m["content"]) for m in live_messages] == [
        (uuid.UUID(retry["new_request_id"]), "user", "original question")
    ]

    # the retried turn runs: it cannot be replaced yet
    edit_too_soon = live.gateway.edit(tenant, user, chat, retry["new_request_id"], "edited")
    [too_soon] = await live.gateway.decide(edit_too_soon)
    assert (too_soon["decision"], too_soon["error_code"]) == ("reject", "invalid_turn_state")

    await live.gateway.send_provider(
        live.gateway.provider(
            "turn.completed", retry, content="again", usage={"input_tokens": 1, "output_tokens": 1}
        )
    )
    await wait_until(
        lambda: live.db.fetchval(
            "SELECT settled_at IS NOT NULL FROM chat_turns WHERE chat_id = $1 AND request_id = $2",
            chat,
            uuid.UUID(retry["new_request_id"]),
        ),
        timeout=30,
        what="the retried turn to settle",
    )
    edit = live.gateway.edit(tenant, user, chat, retry["new_request_id"], "edited question")
    stale = live.gateway.retry(tenant, user, chat, first["request_id"])
    unknown = live.gateway.retry(tenant, user, chat, uuid.uuid4())
    edited, not_latest, not_found = await live.gateway.decide(edit, stale, unknown)
    assert edited["decision"] == "allow"
    assert (not_latest["decision"], not_latest["error_code"]) == ("reject", "not_latest_turn")
    assert (not_found["decision"], not_found["error_code"]) == ("reject", "turn_not_found")
    contents = await live.db.fetch(
        "SELECT content FROM messages WHERE chat_id = $1 AND role = 'user' AND deleted_at IS NULL", chat
    )
    assert [m["content"] for m in contents] == ["edited question"]
    running = await live.db.fetchval(
        "SELECT count(*) FROM chat_turns WHERE chat_id = $1 AND state = 'running' AND deleted_at IS NULL",
        chat,
    )
    assert running == 1


async def test_turn_delete_soft_deletes_the_latest_terminal_turn(live: Live) -> None:
    tenant, user, chat = ids()
    first = await _finished_turn(live, tenant, user, chat, "one")
    second = await _finished_turn(live, tenant, user, chat, "two")
    delete_first = live.gateway.delete_turn(tenant, user, chat, first["request_id"])
    delete_second = live.gateway.delete_turn(tenant, user, chat, second["request_id"])
    delete_again = live.gateway.delete_turn(tenant, user, chat, second["request_id"])
    not_latest, done, again = await live.gateway.decide(delete_first, delete_second, delete_again)
    assert (not_latest["decision"], not_latest["error_code"]) == ("reject", "not_latest_turn")
    assert (done["decision"], done["request_id"]) == ("done", second["request_id"])
    assert (again["decision"], again["error_code"]) == ("reject", "not_latest_turn")
    rows = await live.db.fetch(
        "SELECT request_id, deleted_at IS NOT NULL AS deleted FROM chat_turns WHERE chat_id = $1", chat
    )
    assert {r["request_id"]: r["deleted"] for r in rows} == {
        uuid.UUID(first["request_id"]): False,
        uuid.UUID(second["request_id"]): True,
    }
    left = await live.db.fetch("SELECT content FROM messages WHERE chat_id = $1 AND deleted_at IS NULL", chat)
    assert sorted(m["content"] for m in left) == ["answer", "one"]
    # now the first turn is the latest again and can be deleted
    [done_first] = await live.gateway.decide(
        live.gateway.delete_turn(tenant, user, chat, first["request_id"])
    )
    assert done_first["decision"] == "done"
