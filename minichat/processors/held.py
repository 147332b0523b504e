"""A batch's turns held in memory between its steps and written once, as they end up.

A turn's command and its provider and usage events often land in one merged batch, in different
steps (processors/levels.py): the command step inserted the turn and each event step updated it
again, every write a row version and index entries. Instead the steps share the batch's working
turns: the command step starts a turn here (its decision, user message and reserve are written
as before), the event steps change it in place (their quota rows and billing outbox are written as
before: commands of the batch read them), and the batch writes it once at its end — a turn it
started inserted in its final state, a turn it loaded updated once (`storage.turns.write_held`).

Nothing reads a held turn's row before it is written: only commands of the same chat read a chat's
turns and messages (latest turn, targets, the chat's next `turn_seq`), and a command step first
writes the held turns of its chats (`TurnRequests`); events read held turns from here, never from
the database. The final rows equal those of the write-as-you-go path, which a rebuild
(`tools/rebuild`) keeps, as its per-handler counting reads the rows; the digest tests compare the two.

The set is found through a context variable that `MergedBatches.apply` sets for its own task (as
`combined.Frame` is): a handler called without it writes as it goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from minichat.domain.commands import NewTurn
from minichat.domain.settlement import UsageFigures
from minichat.domain.turns import AssistantMessage, TurnRecord
from minichat.storage.turns import HeldInsert, TurnWrite, write_held


@dataclass(slots=True)
class Held:
    turn: TurnRecord
    """The working turn (event steps change it in place)."""
    started: NewTurn | None
    """The admission of a turn this batch started: not stored yet."""
    order: int
    changed: bool = False
    progressed: bool = False
    awaiting_usage: bool = False
    message: AssistantMessage | None = None
    """The assistant message to insert (with the usage reported so far)."""
    message_usage: bool = False
    """The turn's stored message takes the usage reported for it."""


def _started_turn(new: NewTurn) -> TurnRecord:
    """The turn as `load_turns` reads the row `_INSERT_TURNS` writes for `new`."""
    return TurnRecord(
        id=new.id,
        tenant_id=new.tenant_id,
        chat_id=new.chat_id,
        request_id=new.request_id,
        requester_user_id=new.requester_user_id,
        selected_model=new.selected_model,
        effective_model=new.effective_model,
        reserve_tokens=new.reserve_tokens,
        max_output_tokens_applied=new.max_output_tokens_applied,
        reserved_credits_micro=new.reserved_credits_micro,
        policy_version_applied=new.policy_version_applied,
        minimal_generation_floor_applied=new.minimal_generation_floor_applied,
        period_daily=new.period_daily,
        period_monthly=new.period_monthly,
        state="running",
        updated_at=new.started_at,
        last_progress_at=new.started_at,
    )


class HeldTurns:
    """The working turns of one batch, by (chat, request)."""

    def __init__(self) -> None:
        self._turns: dict[tuple[int, int], Held] = {}
        self._order = 0

    def get(self, chat_id: UUID, request_id: UUID) -> Held | None:
        return self._turns.get((chat_id.int, request_id.int))

    def _add(self, turn: TurnRecord, started: NewTurn | None) -> None:
        self._order += 1
        self._turns[(turn.chat_id.int, turn.request_id.int)] = Held(turn, started, self._order)

    def start(self, turns: Iterable[NewTurn]) -> None:
        """Turns a command step started (in the order it started them)."""
        for new in turns:
            self._add(_started_turn(new), new)

    def hold(self, turn: TurnRecord) -> None:
        """A stored turn an event step loaded (and locked)."""
        self._add(turn, None)

    def keep(
        self,
        writes: Iterable[TurnWrite],
        messages: Iterable[AssistantMessage],
        message_usage: Iterable[TurnRecord],
    ) -> None:
        """An event step's writes, kept instead of written (every turn named is held)."""
        for write in writes:
            self.changed(write)
        for message in messages:
            self.message(message)
        for turn in message_usage:
            self.usage(turn)

    def changed(self, write: TurnWrite) -> None:
        held = self._turns[(write.turn.chat_id.int, write.turn.request_id.int)]
        held.turn = write.turn
        held.changed = True
        held.progressed |= write.progressed
        held.awaiting_usage |= write.awaiting_usage

    def message(self, message: AssistantMessage) -> None:
        self._turns[(message.chat_id.int, message.request_id.int)].message = message

    def usage(self, turn: TurnRecord) -> None:
        """The usage reported for a turn whose message an earlier step or batch inserted."""
        held = self._turns[(turn.chat_id.int, turn.request_id.int)]
        if held.message is not None:  # not written yet: inserted with the usage
            held.message = with_usage(held.message, turn.usage)
        else:
            held.message_usage = True

    def take(self, chats: Iterable[UUID] | None = None) -> list[Held]:
        """The held turns of `chats` (all when None), in the order they were held, given up."""
        if chats is None:
            taken = list(self._turns.values())
            self._turns.clear()
        else:
            wanted = {c.int for c in chats}
            keys = [k for k in self._turns if k[0] in wanted]
            taken = [self._turns.pop(k) for k in keys]
        taken.sort(key=lambda h: h.order)
        return taken


def with_usage(message: AssistantMessage, usage: UsageFigures | None) -> AssistantMessage:
    """`dataclasses.replace(message, usage=usage)`, spelled out (it introspects the fields per call)."""
    m = message
    return AssistantMessage(
        m.id,
        m.tenant_id,
        m.chat_id,
        m.request_id,
        m.content,
        m.model,
        m.provider_response_id,
        usage,
        m.created_at,
    )


async def write(con: asyncpg.Connection, taken: Iterable[Held]) -> None:
    """Write given-up turns: started ones inserted as they are, changed ones updated once."""
    inserts: list[HeldInsert] = []
    updates: list[TurnWrite] = []
    messages: list[AssistantMessage] = []
    message_usage: list[TurnRecord] = []
    for h in taken:
        if h.started is not None:
            inserts.append(HeldInsert(h.started, h.turn, h.awaiting_usage))
        elif h.changed:
            updates.append(TurnWrite(h.turn, h.progressed, h.awaiting_usage))
        if h.message is not None:
            messages.append(h.message)
        if h.message_usage:
            message_usage.append(h.turn)
    if inserts or updates or messages or message_usage:
        await write_held(
            con, inserts=inserts, updates=updates, messages=messages, message_usage=message_usage
        )


_HELD: ContextVar[HeldTurns | None] = ContextVar("minichat_held_turns", default=None)


def current() -> HeldTurns | None:
    """The running batch's held turns; None: write as you go."""
    return _HELD.get()


@contextmanager
def holding(held: HeldTurns | None) -> Iterator[None]:
    """Make `held` the current task's for the block."""
    token = _HELD.set(held)
    try:
        yield
    finally:
        _HELD.reset(token)
