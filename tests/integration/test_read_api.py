"""The read API against a live worker (docs/contract.md, "Read API"): every route, pagination over a few
hundred messages, 401 without or with a bad token, 404 (identical) for another tenant's or unknown
ids, `blocked` from the stored rows, and no content in the worker's log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from minichat.bench.workers import free_port
from minichat.domain.quota_view import default_model, smallest_request
from minichat.models.policy import load_policy
from minichat.processors.tokens import add_token
from tests.conftest import Live, live_deployment
from tests.gateway import Event, policy_file
from tests.openapi_check import read_checked
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration

TURNS = 150  # 300 messages
MARKER = "READ-API-MARKER-91c2"


@dataclass
class Api:
    live: Live
    base: str
    http: aiohttp.ClientSession
    tokens: dict[str, str]
    tenant: uuid.UUID
    other_tenant: uuid.UUID
    limited_tenant: uuid.UUID

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(self.base + path, headers=headers) as response:
            return response.status, await read_checked(response)


@pytest.fixture(scope="module")
async def api(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    workdir = tmp_path_factory.mktemp("read-api")
    tenant, other, limited = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    policy = load_policy(policy_file(workdir))
    model = default_model(policy)
    assert model is not None
    small = smallest_request(policy, model)
    limits = {"standard": {"daily": 4 * small}}
    path = policy_file(workdir, tenants={str(limited): {"limits": limits}})
    tokens_file = workdir / "tokens.json"
    tokens = {name: add_token(tokens_file, t) for name, t in (("a", tenant), ("b", other), ("c", limited))}
    port = free_port()
    env = {
        "MINICHAT_WEB_ENABLED": "true",
        "MINICHAT_WEB_PORT": str(port),
        "MINICHAT_READ_TOKENS_FILE": str(tokens_file),
    }
    async with (
        live_deployment(endpoints, template_database, workdir, policy=path, env=env) as live,
        aiohttp.ClientSession() as http,
    ):
        found = Api(live, f"http://127.0.0.1:{port}", http, tokens, tenant, other, limited)

        async def ready() -> bool:
            try:
                status, _ = await found.get("/ready")
            except aiohttp.ClientError:
                return False
            return status == 200

        await wait_until(ready, timeout=60, what="/ready")
        yield found


async def conversation(api: Api, user: uuid.UUID, chat: uuid.UUID, turns: int) -> list[Event]:
    """A chat's turns as a gateway sends them: each next request after the previous completion."""
    gw = api.live.gateway
    commands = []
    for i in range(turns):
        command = gw.requested(api.tenant, user, chat, content=f"{MARKER} question {i}")
        await gw.send(command)
        usage = {"input_tokens": 10 + i, "output_tokens": 20 + i}
        await gw.send_provider(
            gw.provider("turn.completed", command, content=f"{MARKER} answer {i}", usage=usage)
        )
        commands.append(command)

    async def settled() -> bool:
        count = await api.live.db.fetchval(
            "SELECT count(*) FROM chat_turns WHERE chat_id = $1 AND settled_at IS NOT NULL", chat
        )
        return bool(count == turns)

    await wait_until(settled, timeout=120, what=f"{turns} turns settled")
    return commands


async def test_health_and_ready(api: Api) -> None:
    assert await api.get("/health") == (200, {"status": "ok"})
    assert await api.get("/ready") == (200, {"status": "ready"})


async def test_messages_page_through_a_long_chat_in_order(api: Api) -> None:
    user, chat = uuid.uuid4(), uuid.uuid4()
    commands = await conversation(api, user, chat, TURNS)
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"?limit=100&after={cursor}" if cursor else "?limit=100"
        status, body = await api.get(f"/v1/chats/{chat}/messages{query}", api.tokens["a"])
        assert status == 200, body
        seen += body["messages"]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 2 * TURNS
    expected = [
        (c["request_id"], role, f"{MARKER} {word} {i}")
        for i, c in enumerate(commands)
        for role, word in (("user", "question"), ("assistant", "answer"))
    ]
    assert [(m["request_id"], m["role"], m["content"]) for m in seen] == expected
    assert seen[1]["input_tokens"] == 10 and seen[1]["output_tokens"] == 20 and seen[1]["model"]
    status, body = await api.get(f"/v1/chats/{chat}/messages", api.tokens["a"])
    assert status == 200 and len(body["messages"]) == 50 and body["next"]  # the default page

    assert (await api.get(f"/v1/chats/{chat}/messages?limit=501", api.tokens["a"]))[0] == 400
    assert (await api.get(f"/v1/chats/{chat}/messages?limit=x", api.tokens["a"]))[0] == 400
    assert (await api.get(f"/v1/chats/{chat}/messages?after=not-a-cursor", api.tokens["a"]))[0] == 400

    # the turn of the first request, settled
    status, turn = await api.get(f"/v1/chats/{chat}/turns/{commands[0]['request_id']}", api.tokens["a"])
    assert status == 200, turn
    assert (turn["state"], turn["billing_outcome"], turn["settlement_method"]) == (
        "completed",
        "completed",
        "actual",
    )
    assert turn["usage"]["input_tokens"] == 10 and turn["committed_credits_micro"] > 0 and turn["settled_at"]
    assert turn["decision"]["decision"] == "allow" and turn["decision"]["replay"] is False
    assert turn["decision"]["command_event_id"] == commands[0]["event_id"]

    # nothing of it for another tenant, nor for unknown or malformed ids: one identical answer
    not_found = (404, {"error": "not_found"})
    assert await api.get(f"/v1/chats/{chat}/messages", api.tokens["b"]) == not_found
    assert await api.get(f"/v1/chats/{chat}/turns/{commands[0]['request_id']}", api.tokens["b"]) == not_found
    assert await api.get(f"/v1/users/{user}/quota", api.tokens["b"]) == not_found
    assert await api.get(f"/v1/chats/{uuid.uuid4()}/messages", api.tokens["a"]) == not_found
    assert await api.get(f"/v1/chats/{chat}/turns/{uuid.uuid4()}", api.tokens["a"]) == not_found
    assert await api.get(f"/v1/users/{uuid.uuid4()}/quota", api.tokens["a"]) == not_found
    assert await api.get("/v1/chats/not-a-uuid/messages", api.tokens["a"]) == not_found

    # no content in the worker's log (an access log, when the web server writes one, has paths)
    assert MARKER not in "\n".join(w.log() for w in api.live.workers)


async def test_a_refused_request_shows_its_decision(api: Api) -> None:
    gw = api.live.gateway
    user, chat = uuid.uuid4(), uuid.uuid4()
    first = gw.requested(api.tenant, user, chat)
    second = gw.requested(api.tenant, user, chat)  # while the first still runs
    decisions = await gw.decide(first, second)
    assert [d["decision"] for d in decisions] == ["allow", "reject"]
    status, turn = await api.get(f"/v1/chats/{chat}/turns/{second['request_id']}", api.tokens["a"])
    assert status == 200, turn
    assert turn["state"] is None and turn["usage"] is None
    assert (turn["decision"]["decision"], turn["decision"]["error_code"]) == (
        "reject",
        "generation_in_progress",
    )
    status, running = await api.get(f"/v1/chats/{chat}/turns/{first['request_id']}", api.tokens["a"])
    assert status == 200 and running["state"] == "running" and running["settled_at"] is None


async def test_quota_shows_the_rows_and_why_a_user_is_blocked(api: Api) -> None:
    gw = api.live.gateway
    user = uuid.uuid4()
    decisions = []
    for _ in range(8):  # reserves pile up (nothing completes) until the limit refuses
        [decision] = await gw.decide(gw.requested(api.limited_tenant, user, uuid.uuid4()))
        decisions.append(decision)
        if decision["decision"] == "reject":
            break
    assert decisions[-1]["error_code"] == "quota_exceeded", decisions
    allowed = [d for d in decisions if d["decision"] != "reject"]

    status, body = await api.get(f"/v1/users/{user}/quota", api.tokens["c"])
    assert status == 200, body
    [total_daily] = [b for b in body["buckets"] if (b["bucket"], b["period_type"]) == ("total", "daily")]
    reserved = sum(d["reserved_credits_micro"] for d in allowed)
    assert (total_daily["spent"], total_daily["reserved"]) == (0, reserved)
    assert total_daily["remaining"] == max(0, total_daily["limit"] - reserved)
    assert {t["tool"] for t in body["tools"]} == {"web_search", "code_interpreter"}
    blocked = body["blocked"]
    assert blocked is not None and (blocked["bucket"], blocked["period_type"]) == ("total", "daily")
    row_changed = await api.live.db.fetchval(
        "SELECT updated_at FROM quota_usage WHERE tenant_id = $1 AND user_id = $2"
        " AND bucket = 'total' AND period_type = 'daily'",
        api.limited_tenant,
        user,
    )
    assert blocked["since"] == row_changed.isoformat().replace("+00:00", "Z")

    # a user of the unlimited tenant with a settled turn is not blocked
    free_user, chat = uuid.uuid4(), uuid.uuid4()
    await conversation(api, free_user, chat, 1)
    status, body = await api.get(f"/v1/users/{free_user}/quota", api.tokens["a"])
    assert status == 200 and body["blocked"] is None
    [daily] = [b for b in body["buckets"] if (b["bucket"], b["period_type"]) == ("total", "daily")]
    assert daily["spent"] > 0 and daily["reserved"] == 0


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic abc", "bearer x"])
async def test_v1_routes_need_a_known_bearer_token(api: Api, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for path in (
        f"/v1/chats/{uuid.uuid4()}/messages",
        f"/v1/chats/{uuid.uuid4()}/turns/{uuid.uuid4()}",
        f"/v1/users/{uuid.uuid4()}/quota",
    ):
        async with api.http.get(api.base + path, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert await read_checked(response) == {"error": "unauthorized"}


async def test_tokens_add_prints_a_token_and_stores_only_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tenant = uuid.uuid4()
    token = add_token(path, tenant)
    stored = path.read_text()
    assert token not in stored and str(tenant) in stored
    assert path.stat().st_mode & 0o777 == 0o600
