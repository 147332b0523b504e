"""The turn-requests agent: every command answered by exactly one `turn.decision`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from minichat.domain.admission import RecordedOutcome
from minichat.domain.commands import Answer, Command, command_id_of, decide_batch
from minichat.domain.recorded import recorded_outcome
from minichat.domain.turns import TurnEvent
from minichat.models.events import TurnRequestEvent
from minichat.models.policy import Policy
from minichat.processors.held import current
from minichat.processors.held import write as write_held
from minichat.processors.metrics import Metrics
from minichat.processors.pipeline import Decoded
from minichat.processors.records import Output
from minichat.processors.turn_events import apply_turn_events, parked_items
from minichat.storage.policies import PolicySnapshots
from minichat.storage.recorded import lookup_recorded
from minichat.storage.turn_requests import load_batch_state, write_changes
from minichat.storage.turns import UNPARK_MAX, unpark


@dataclass(frozen=True)
class TurnRequests:
    """Handler of one batch: load under the locks, decide in order, write set-based, then apply
    the provider and usage events that were parked waiting for these decisions."""

    policy: Policy
    snapshots: PolicySnapshots
    decisions_topic: str
    dead_letters_topic: str
    parked_decoders: dict[str, Callable[[bytes | None, bytes], TurnEvent]]
    metrics: Metrics = field(default_factory=Metrics)
    follow_recorded: bool = False
    """A rebuild: apply the decisions read from `turn-decisions` (storage.recorded) as recorded."""
    versions: Mapping[int, Policy] = field(default_factory=dict)
    """A rebuild: every known policy version; a recorded decision is applied under its own."""

    async def __call__(
        self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnRequestEvent]]
    ) -> list[Output]:
        pending: list[Command] = [(item.event, item.record.timestamp) for item in batch]
        # The caller (processors.batches) holds the request and user locks of the whole batch.
        answers: list[Answer] = []
        outputs: list[Output] = []
        held = current()
        while pending:
            began = time.perf_counter()
            if held is not None:  # what this step reads of its chats' turns is written first
                await write_held(con, held.take({e.chat_id for e, _ in pending}))
            state = await load_batch_state(con, pending)
            if self.follow_recorded:
                state.recorded = await self._recorded(con, pending)
            loaded = time.perf_counter()
            result = decide_batch(state, pending, self.policy, self.versions)
            decided = time.perf_counter()
            await write_changes(con, result.changes, hold_turns=held is not None)
            if held is not None:
                held.start(result.changes.turns)
            stages = {
                "load": loaded - began,
                "decide": decided - loaded,
                "write": time.perf_counter() - decided,
            }
            for stage, seconds in stages.items():
                self.metrics.observe("minichat_batch_stage_seconds", (seconds,), stage=stage, step="commands")
            answers.extend(result.answers)
            outputs.extend(await self._drain_parked(con, result.answers, state.parked_requests))
            pending = pending[result.consumed :]
        return [self._decision(answer) for answer in answers] + outputs

    @staticmethod
    async def _recorded(
        con: asyncpg.Connection, pending: Sequence[Command]
    ) -> dict[tuple[UUID, UUID], RecordedOutcome]:
        found = await lookup_recorded(con, {(e.tenant_id, e.chat_id, command_id_of(e)) for e, _ in pending})
        outcomes = {key: recorded_outcome(payload) for key, payload in found.items()}
        return {key: outcome for key, outcome in outcomes.items() if outcome is not None}

    async def _drain_parked(
        self, con: asyncpg.Connection, answers: Sequence[Answer], waiting: set[tuple[UUID, UUID]]
    ) -> list[Output]:
        """Apply the events parked for the turns these answers started. `waiting`: the (chat,
        request) keys the state load found events for, under the same locks (nothing else is
        parked for them before the drain), so most batches skip the statement."""
        if not waiting:
            return []
        started = (
            (a.fields["tenant_id"], a.fields["chat_id"], a.fields["request_id"])
            for a in answers
            if not a.replay and a.fields["command"] in ("turn.requested", "turn.retry", "turn.edit")
        )
        keys = {key for key in started if key[1:] in waiting}
        outputs: list[Output] = []
        while keys:
            parked = await unpark(con, keys, UNPARK_MAX)
            items = parked_items(parked, self.parked_decoders)
            outputs += await apply_turn_events(
                con, items, self.snapshots, self.dead_letters_topic, self.metrics, park_unknown=False
            )
            if len(parked) < UNPARK_MAX:
                break
        return outputs

    def _decision(self, answer: Answer) -> Output:
        fields = answer.fields
        self.metrics.inc(
            "minichat_decisions_total",
            command=fields["command"],
            decision=fields["decision"],
            error_code=fields["error_code"],
            replay="true" if answer.replay else "false",
        )
        return Output(topic=self.decisions_topic, key=str(fields["chat_id"]).encode(), value=answer.value)
