"""Parking has bounds (issue 10, item 6).

Provider and usage events that arrive before their command is decided are parked, and taken back
when it is. Two ways that went unbounded: events under a command answered for *another tenant's*
chat (nothing is stored under such a key, so they were parked again, forever), and the take-back
itself (one `DELETE ... RETURNING` of everything parked under the batch's requests).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from minichat.storage.turns import UNPARK_MAX
from tests.conftest import Live, live_deployment
from tests.support import Endpoints, wait_until

pytestmark = pytest.mark.integration


async def parked(live: Live, chat: Any) -> int:
    count: int = await live.db.fetchval(
        "SELECT count(*) FROM parked_events WHERE chat_id = $1", uuid.UUID(str(chat))
    )
    return count


async def test_events_under_a_command_refused_for_another_tenants_chat_are_dropped(
    endpoints: Endpoints, template_database: str, tmp_path: Any
) -> None:
    async with live_deployment(endpoints, template_database, tmp_path) as live:
        gw = live.gateway
        owner_tenant, intruder = uuid.uuid4(), uuid.uuid4()
        chat = uuid.uuid4()
        [mine] = await gw.decide(gw.requested(owner_tenant, uuid.uuid4(), chat))
        assert mine["decision"] == "allow"

        # Another tenant's gateway: its provider events first, then its command for that chat.
        theirs = gw.requested(intruder, uuid.uuid4(), chat)
        await gw.send_provider(*(gw.provider("turn.progress", theirs) for _ in range(3)))

        async def three_parked() -> bool:
            return await parked(live, chat) == 3

        await wait_until(three_parked, timeout=30, what="the intruder's events to be parked")
        [answer] = await gw.decide(theirs)
        assert (answer["decision"], answer["error_code"]) == ("reject", "chat_not_found")

        async def none_parked() -> bool:
            return await parked(live, chat) == 0

        await wait_until(none_parked, timeout=30, what="the intruder's parked events to be dropped")
        # the owner's turn is untouched by the intruder's events
        seq = await live.db.fetchval(
            "SELECT progress_seq FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2", owner_tenant, chat
        )
        assert seq == 0


async def test_many_parked_events_are_taken_back_in_bounded_chunks_in_order(
    endpoints: Endpoints, template_database: str, tmp_path: Any
) -> None:
    """More early events than one take-back holds: all of them apply, in their order, and none is
    left parked."""
    count = UNPARK_MAX * 2 + 17
    async with live_deployment(endpoints, template_database, tmp_path) as live:
        gw = live.gateway
        tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        command = gw.requested(tenant, user, chat)
        await gw.send_provider(*(gw.provider("turn.progress", command) for _ in range(count)))

        async def all_parked() -> bool:
            return await parked(live, chat) == count

        await wait_until(all_parked, timeout=60, what=f"{count} events to be parked")
        [decision] = await gw.decide(command)
        assert decision["decision"] == "allow"

        async def all_applied() -> bool:
            seq = await live.db.fetchval(
                "SELECT progress_seq FROM chat_turns WHERE tenant_id = $1 AND chat_id = $2", tenant, chat
            )
            return seq == count and await parked(live, chat) == 0

        await wait_until(all_applied, timeout=60, what="every parked event applied")
