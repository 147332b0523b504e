"""`minichat replay` takes the inputs' end offsets before `turn-decisions`' (docs/guarantees.md).

A rebuild reads two things of Kafka: the input range (up to end offsets taken at some moment) and
the recorded decisions (up to end offsets taken at another). If the decisions' ends were taken
first, a command sent and decided between the two reads would be in the range without its recorded
decision, and the rebuild would decide it afresh under the current policy and state. The rebuild's
`between_reads` hook makes that window deterministic: a live worker decides commands in it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from minichat.tools.rebuild import run_rebuild
from tests.conftest import Live, live_deployment
from tests.support import Endpoints, db_digest, scratch_database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def live(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    async with live_deployment(endpoints, template_database, tmp_path_factory.mktemp("order")) as deployment:
        yield deployment


@pytest.fixture
async def blank_database_url(endpoints: Endpoints, template_database: str) -> AsyncIterator[str]:
    async with scratch_database(endpoints.database_url, "r", template=template_database) as url:
        yield url


async def test_commands_decided_between_the_two_reads_keep_their_recorded_decisions(
    live: Live, endpoints: Endpoints, template_database: str, blank_database_url: str
) -> None:
    g = live.gateway
    tenant = uuid.uuid4()
    first = [g.requested(tenant, uuid.uuid4(), uuid.uuid4()) for _ in range(6)]
    assert [a["decision"] for a in await g.decide(*first)] == ["allow"] * len(first)
    late = [g.requested(tenant, uuid.uuid4(), uuid.uuid4()) for _ in range(6)]
    decided_between: list[str] = []

    async def meanwhile() -> None:
        """The worker decides more commands after the rebuild took the inputs' end offsets."""
        decided_between.extend(a["decision"] for a in await g.decide(*late))

    settings = live.settings.model_copy(update={"database_url": blank_database_url})
    summary = await run_rebuild(settings, show_progress=False, between_reads=meanwhile)

    assert decided_between == ["allow"] * len(late)
    # every command in the range had its recorded decision: none decided by the rebuild itself
    assert summary.decided_afresh == 0, summary.as_dict()
    assert summary.read == len(first)  # the late commands are past the range's end
    assert summary.applied == len(first)

    # the whole log, rebuilt into another empty database: the live state, nothing decided afresh
    async with scratch_database(endpoints.database_url, "r", template=template_database) as url:
        again = await run_rebuild(settings.model_copy(update={"database_url": url}), show_progress=False)
        assert again.decided_afresh == 0
        assert again.read == len(first) + len(late)
        assert await db_digest(url) == await db_digest(live.settings.database_url)


async def test_deletes_are_applied_not_decided_afresh(
    live: Live, endpoints: Endpoints, template_database: str, blank_database_url: str
) -> None:
    """A delete's decision is not one a rebuild follows (no policy decides it): counting it as
    "decided afresh" made the rebuild warn about hundreds of commands after a soak."""
    g = live.gateway
    tenant, user = uuid.uuid4(), uuid.uuid4()
    chats = [uuid.uuid4() for _ in range(3)]
    turns = [g.requested(tenant, user, chat) for chat in chats]
    assert [a["decision"] for a in await g.decide(*turns)] == ["allow"] * len(turns)
    await g.send_provider(*(g.provider("turn.completed", t, content="done") for t in turns))
    await g.send_usage(*(g.usage(t, 10, 20) for t in turns))
    deletes = [
        g.delete_turn(tenant, user, chats[0], turns[0]["request_id"]),
        g.delete_chat(tenant, user, chats[1]),
        g.delete_turn(tenant, user, chats[2], turns[2]["request_id"]),
    ]  # one per chat: each decided after its chat's completion and usage were applied
    assert len(await g.decide(*deletes)) == len(deletes)
    settings = live.settings.model_copy(update={"database_url": blank_database_url})
    summary = await run_rebuild(settings, show_progress=False)
    assert summary.decided_afresh == 0, summary.as_dict()
    assert await db_digest(blank_database_url) == await db_digest(live.settings.database_url)
