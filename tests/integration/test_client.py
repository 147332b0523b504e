"""`minichat.client` against a live worker: every command and fact, replays for repeated ids,
timeouts that say what to do, only the partitions of the chats in flight read, and the example
gateway run as a user would run it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from minichat.client import DecisionTimeout, FailureCode, GatewayClient, MissingTopicError, partition_of
from minichat.models.events import After, Usage
from minichat.models.topics import TopicNames
from tests.conftest import Live
from tests.support import Endpoints, TopicReader, new_prefix, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def client_of(live: Live, **options: float) -> GatewayClient:
    return GatewayClient(live.settings.kafka_bootstrap_servers, live.settings.topic_prefix, **options)


async def test_a_conversation_through_the_client(live: Live) -> None:
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with client_of(live) as client:
        first, second = uuid.uuid4(), uuid.uuid4()
        decision = await client.request_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=first, content="hi", model="gpt-5-mini"
        )
        assert (decision.decision, decision.request_id, decision.replay) == ("allow", first, False)
        assert decision.reserved_credits_micro and decision.effective_model == "gpt-5-mini"
        await client.progress(tenant_id=tenant, chat_id=chat, request_id=first)
        await client.completed(
            tenant_id=tenant,
            chat_id=chat,
            request_id=first,
            content="hello",
            usage=Usage(input_tokens=3, output_tokens=5),
        )
        # the next message right after the completion's ack: ordered, never generation_in_progress
        nxt = await client.request_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=second, content="more"
        )
        assert nxt.decision == "allow", nxt
        await client.completed(
            tenant_id=tenant, chat_id=chat, request_id=second, content="partial", usage=None
        )
        await client.usage(
            tenant_id=tenant, chat_id=chat, request_id=second, usage=Usage(input_tokens=2, output_tokens=2)
        )
        retried = uuid.uuid4()
        again = await client.retry_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=second, new_request_id=retried
        )
        assert (again.command, again.decision, again.request_id) == ("turn.retry", "allow", retried)
        spent = Usage(input_tokens=1, output_tokens=1)
        await client.failed(
            tenant_id=tenant, chat_id=chat, request_id=retried, error_code="provider_error", usage=spent
        )
        edited = uuid.uuid4()
        edit = await client.edit_turn(
            tenant_id=tenant,
            chat_id=chat,
            user_id=user,
            request_id=retried,
            new_request_id=edited,
            content="fixed",
        )
        assert edit.decision == "allow", edit
        await client.cancelled(
            tenant_id=tenant, chat_id=chat, request_id=edited, content="stopped", usage=spent
        )
        gone = await client.delete_turn(tenant_id=tenant, chat_id=chat, user_id=user, request_id=edited)
        assert (gone.command, gone.decision) == ("turn.delete", "done")
        closed = await client.delete_chat(tenant_id=tenant, chat_id=chat, user_id=user)
        assert (closed.command, closed.decision) == ("chat.delete", "done")

        async def all_settled() -> bool:
            count = await live.db.fetchval(
                "SELECT count(*) FROM chat_turns WHERE tenant_id = $1 AND settled_at IS NOT NULL", tenant
            )
            return bool(count == 4)

        await wait_until(all_settled, timeout=30, what="every turn of the conversation settled")
        # only the decision partition of this one chat was read
        assert list(client.decision_partitions()) == [partition_of(chat, live.settings.partitions)]


async def test_repeating_a_command_returns_the_stored_decision(live: Live) -> None:
    tenant, user, chat, request = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with client_of(live) as client:
        ask = {"tenant_id": tenant, "chat_id": chat, "user_id": user, "request_id": request}
        first = await client.request_turn(**ask, content="hi", model="gpt-5-mini")
        second = await client.request_turn(**ask, content="hi", model="gpt-5-mini")
        assert (first.replay, second.replay) == (False, True)
        assert second.model_copy(update={"replay": False}) == first
        # concurrent calls for many chats, each answered with its own decision
        chats = [uuid.uuid4() for _ in range(20)]
        answers = await asyncio.gather(
            *(
                client.request_turn(
                    tenant_id=tenant,
                    chat_id=c,
                    user_id=user,
                    request_id=uuid.uuid4(),
                    content="x",
                    model="gpt-5-mini",
                )
                for c in chats
            )
        )
        assert [a.chat_id for a in answers] == chats and {a.decision for a in answers} == {"allow"}


async def test_a_timeout_says_the_command_will_still_be_decided(live: Live) -> None:
    tenant, user, chat, request = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with client_of(live) as client:
        with pytest.raises(DecisionTimeout) as caught:
            await client.request_turn(
                tenant_id=tenant,
                chat_id=chat,
                user_id=user,
                request_id=request,
                content="hi",
                model="gpt-5-mini",
                timeout_s=0.001,
            )
        assert "will be decided" in str(caught.value) and f"/v1/chats/{chat}/turns/{request}" in str(
            caught.value
        )
        again = await client.request_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=request, content="hi", model="gpt-5-mini"
        )
        assert again.decision == "allow" and again.request_id == request


async def test_the_example_gateway_plays_its_conversation(live: Live) -> None:
    env = {
        **os.environ,
        "MINICHAT_KAFKA_BOOTSTRAP_SERVERS": live.settings.kafka_bootstrap_servers,
        "MINICHAT_TOPIC_PREFIX": live.settings.topic_prefix,
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "examples" / "gateway.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(": allow on gpt-5-mini") == 2 and "chat deleted: done" in result.stdout


async def test_the_client_fills_after_from_the_acknowledged_terminal_and_usage_events(live: Live) -> None:
    """Each turn-creating command carries the offsets of the chat's last terminal and usage events
    as the broker acknowledged them; a caller's own `after` wins; commands are decided as usual."""
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    names = TopicNames(live.settings.topic_prefix)
    async with (
        client_of(live) as client,
        TopicReader(live.settings.kafka_bootstrap_servers, names.provider_responses) as facts,
        TopicReader(live.settings.kafka_bootstrap_servers, names.turn_requests) as commands,
    ):
        first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await client.request_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=first, content="hi", model="gpt-5-mini"
        )
        assert client.token(chat) is None
        await client.progress(tenant_id=tenant, chat_id=chat, request_id=first)
        assert client.token(chat) is None  # progress is not a terminal event
        await client.completed(tenant_id=tenant, chat_id=chat, request_id=first, content="hello")
        await client.usage(
            tenant_id=tenant, chat_id=chat, request_id=first, usage=Usage(input_tokens=3, output_tokens=5)
        )
        await facts.wait_for(
            lambda values: sum(v["chat_id"] == str(chat) for v in values) == 2, what="progress, completion"
        )
        ours = [r for r in facts.records if r.key == str(chat).encode()]
        terminal = max(r.offset for r in ours)  # the completion (after the progress)
        token = client.token(chat)
        assert token is not None and token.provider_responses == terminal and token.usage is not None
        nxt = await client.request_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=second, content="more"
        )
        assert nxt.decision == "allow", nxt
        await client.failed(tenant_id=tenant, chat_id=chat, request_id=second, error_code="provider_error")
        failed_token = client.token(chat)
        assert failed_token is not None and failed_token.provider_responses is not None
        assert failed_token.provider_responses > terminal and failed_token.usage == token.usage
        mine = After.of(usage=0)  # the caller's own token wins
        edit = await client.edit_turn(
            tenant_id=tenant,
            chat_id=chat,
            user_id=user,
            request_id=second,
            new_request_id=third,
            content="fixed",
            after=mine,
        )
        assert edit.decision == "allow", edit
        sent = await commands.wait_for(
            lambda values: sum(v["chat_id"] == str(chat) for v in values) == 3, what="the three commands"
        )
        carried = [v.get("after") for v in sent if v["chat_id"] == str(chat)]
        assert carried == [
            None,
            {"provider-responses": terminal, "usage": token.usage},
            {"provider-responses": None, "usage": 0},
        ]


async def test_ids_may_be_given_as_text(live: Live) -> None:
    tenant, user, chat, request = (str(uuid.uuid4()) for _ in range(4))
    async with client_of(live) as client:
        decision = await client.request_turn(
            tenant_id=tenant, chat_id=chat, user_id=user, request_id=request, content="hi", model="gpt-5-mini"
        )
        assert decision.decision == "allow" and decision.request_id == uuid.UUID(request)
        await client.failed(
            tenant_id=tenant, chat_id=chat, request_id=request, error_code=FailureCode.PROVIDER_NOT_CALLED
        )
        assert client.token(chat) is not None
        with pytest.raises(ValueError, match="user_id must be a UUID"):
            await client.delete_chat(tenant_id=tenant, chat_id=chat, user_id="alice")


async def test_a_failed_start_stops_the_clients_it_started(endpoints: Endpoints) -> None:
    """A missing topic is found after the producer and both consumers started: they are stopped
    again (no task of theirs left running), and the error names the topic and the fix."""
    before = asyncio.all_tasks()
    client = GatewayClient(endpoints.kafka, new_prefix())
    with pytest.raises(
        MissingTopicError, match=r"turn-decisions does not exist: run `minichat topics create`"
    ):
        async with client:
            pass
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert left == [], [t.get_coro() for t in left]
