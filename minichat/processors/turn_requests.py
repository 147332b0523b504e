"""The turn-requests agent: every command answered by exactly one `turn.decision`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from minichat.domain.commands import Answer, Command, decide_batch
from minichat.models.events import TurnRequestEvent
from minichat.models.policy import Policy
from minichat.processors.pipeline import Decoded
from minichat.processors.records import Output
from minichat.storage.turn_requests import load_batch_state, write_changes


@dataclass(frozen=True)
class TurnRequests:
    """Handler of one batch: load under the user locks, decide in order, write set-based."""

    policy: Policy
    decisions_topic: str

    async def __call__(
        self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnRequestEvent]]
    ) -> list[Output]:
        pending: list[Command] = [(item.event, item.record.timestamp) for item in batch]
        answers: list[Answer] = []
        while pending:
            state = await load_batch_state(con, pending)
            result = decide_batch(state, pending, self.policy)
            await write_changes(con, result.changes)
            answers.extend(result.answers)
            pending = pending[result.consumed :]
        return [self._output(answer) for answer in answers]

    def _output(self, answer: Answer) -> Output:
        payload = {**answer.payload, "replay": answer.replay}
        value = json.dumps(payload, separators=(",", ":")).encode()
        return Output(topic=self.decisions_topic, key=str(payload["chat_id"]).encode(), value=value)
