"""Conversation order of `GET /v1/chats/{id}/messages` when times tie (docs/contract.md, "Read
API"): a gateway sends the next question in the millisecond the answer was acknowledged, so
question N+1 and answer N (and here every record of the chat) carry one timestamp. The records are
applied by the engine's own batches with explicit record timestamps (the broker's LogAppendTime
cannot be chosen), and the chat is paged through the read API's real routes on PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from minichat.models.policy import load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.batches import MergedBatches
from minichat.processors.pipeline import Decoded
from minichat.processors.records import SourceRecord
from minichat.processors.tokens import add_token
from minichat.settings import Settings
from minichat.storage.db import connect
from minichat.storage.policies import ensure_policy_version
from tests.conftest import deployment_settings
from tests.gateway import Event, Gateway
from tests.openapi_check import read_checked
from tests.read_server import serve_read_api
from tests.support import Endpoints

pytestmark = pytest.mark.integration

TURNS = 6
TIED = datetime(2026, 12, 7, 10, 0, 0, 123000, tzinfo=UTC)


async def apply(con: asyncpg.Connection, batches: MergedBatches, record: SourceRecord) -> None:
    [good] = [d for d in batches.decode([record]) if isinstance(d, Decoded)]
    async with con.transaction():
        await batches.apply(con, [good])


class Reader:
    """The read API's routes on an in-process server over the scratch database."""

    def __init__(self, base: str, http: aiohttp.ClientSession, token: str) -> None:
        self.base, self.http, self.token = base, http, token

    async def get(self, path: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.get(self.base + path, headers=headers) as response:
            return response.status, await read_checked(response)

    async def pages(self, chat: uuid.UUID, limit: int) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = f"?limit={limit}&after={cursor}" if cursor else f"?limit={limit}"
            status, body = await self.get(f"/v1/chats/{chat}/messages{query}")
            assert status == 200, body
            assert len(body["messages"]) <= limit
            seen += body["messages"]
            cursor = body["next"]
            if cursor is None:
                return seen


@pytest.fixture
async def served(
    endpoints: Endpoints, database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Settings, uuid.UUID, Reader]]:
    settings = deployment_settings(endpoints, database_url)
    tenant = uuid.uuid4()
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, tenant)
    async with serve_read_api(settings, tokens) as (base, http):
        yield settings, tenant, Reader(base, http, token)


def record(topic: str, offset: int, event: Event) -> SourceRecord:
    return SourceRecord(topic, 0, offset, str(event["chat_id"]).encode(), json.dumps(event).encode(), TIED)


async def test_question_n_plus_1_and_answer_n_in_one_millisecond_come_in_turn_order(
    served: tuple[Settings, uuid.UUID, Reader],
) -> None:
    settings, tenant, reader = served
    names = TopicNames(settings.topic_prefix)
    policy = load_policy(settings.policy_file)
    batches = build_batches(settings, policy)
    gw = Gateway(settings, None)  # type: ignore[arg-type]  # builds events only
    user, chat = uuid.uuid4(), uuid.uuid4()
    # request ids that sort against the turn order: no tie-break by id can pass by luck
    request_ids = sorted((uuid.uuid4() for _ in range(TURNS)), reverse=True)
    con = await connect(settings)
    try:
        await ensure_policy_version(con, policy)
        for i, request_id in enumerate(request_ids):
            command = gw.requested(tenant, user, chat, content=f"question {i}", request_id=request_id)
            answer = gw.provider(
                "turn.completed",
                command,
                content=f"answer {i}",
                usage={"input_tokens": 3, "output_tokens": 4},
            )
            await apply(con, batches, record(names.turn_requests, i, command))
            await apply(con, batches, record(names.provider_responses, i, answer))
        stored = await con.fetch(
            "SELECT DISTINCT created_at FROM messages WHERE tenant_id = $1 AND chat_id = $2", tenant, chat
        )
        assert [r["created_at"] for r in stored] == [TIED]  # one millisecond for every message
        expected = [
            (str(request_id), role, f"{word} {i}")
            for i, request_id in enumerate(request_ids)
            for role, word in (("user", "question"), ("assistant", "answer"))
        ]
        for limit in (1, 2, 3, 5, 500):
            seen = await reader.pages(chat, limit)
            assert [(m["request_id"], m["role"], m["content"]) for m in seen] == expected, f"limit={limit}"
        seqs = await con.fetch(
            "SELECT request_id, turn_seq FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2", tenant, chat
        )
        assert {r["request_id"]: r["turn_seq"] for r in seqs} == {r: i + 1 for i, r in enumerate(request_ids)}

        # The engine's "latest turn" follows the same order: a retry of the last turn applied is
        # accepted, one of an earlier turn (the greatest id, the latest by an id tie-break) is not.
        early = gw.retry(tenant, user, chat, request_ids[0])
        await apply(con, batches, record(names.turn_requests, TURNS, early))
        latest = gw.retry(tenant, user, chat, request_ids[-1])
        await apply(con, batches, record(names.turn_requests, TURNS + 1, latest))
        decided = {
            r["command_id"]: (r["decision"], r["error_code"])
            for r in await con.fetch(
                "SELECT command_id, decision, error_code FROM turn_decisions"
                " WHERE tenant_id = $1 AND chat_id = $2",
                tenant,
                chat,
            )
        }
        assert decided[uuid.UUID(str(early["new_request_id"]))] == ("reject", "not_latest_turn")
        assert decided[uuid.UUID(str(latest["new_request_id"]))][0] == "allow"
    finally:
        await con.close()
