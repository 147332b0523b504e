"""A rebuild that decides some commands afresh although `turn-decisions` recorded them: the
commands whose event time a predicate selects (`minichat policy diff`: the window a candidate
policy is tried on). The others follow their recorded decisions, as in any rebuild."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from minichat.domain.admission import RecordedOutcome
from minichat.domain.commands import Command, command_id_of
from minichat.processors.turn_requests import TurnRequests

Afresh = Callable[[datetime], bool]
"""True for a command's event time (its record timestamp) when it is to be decided afresh."""


@dataclass(frozen=True)
class Seen:
    """What a rebuild saw of the commands: every tenant, and the user of each selected command."""

    tenants: set[UUID]
    users: dict[tuple[UUID, UUID], UUID]


def _never(_: datetime) -> bool:
    return False


@dataclass(frozen=True)
class SelectiveTurnRequests(TurnRequests):
    """The worker's handler, with the recorded outcomes of the selected commands left out: those
    are decided under the handler's own (current) policy and priced under its version."""

    afresh: Afresh = _never
    users: dict[tuple[UUID, UUID], UUID] = dataclasses.field(default_factory=dict)
    """(chat, command id) -> requesting user of each selected command (a refused one makes no
    chat row to read it from)."""

    async def _recorded(  # type: ignore[override]
        self, con: asyncpg.Connection, pending: Sequence[Command]
    ) -> dict[tuple[UUID, UUID], RecordedOutcome]:
        found = await TurnRequests._recorded(con, pending)
        chosen = {(event.chat_id, command_id_of(event)) for event, at in pending if self.afresh(at)}
        self.users.update(
            ((event.chat_id, command_id_of(event)), event.user_id) for event, at in pending if self.afresh(at)
        )
        return {key: outcome for key, outcome in found.items() if key not in chosen}


def selective(handler: TurnRequests, afresh: Afresh) -> SelectiveTurnRequests:
    """`handler` deciding afresh the commands `afresh` selects."""
    fields = {f.name: getattr(handler, f.name) for f in dataclasses.fields(handler)}
    return SelectiveTurnRequests(**fields, afresh=afresh)
