"""What a rebuild counts: each record read is applied, already applied, parked or dead-lettered
(see the package docstring for what each means). The handler wrappers read the state before and
after the worker's own handlers (storage/rebuild.py) to tell."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from minichat.domain.commands import command_id_of
from minichat.domain.turns import TurnEvent
from minichat.models.events import TurnEdit, TurnRequested, TurnRequestEvent, TurnRetry
from minichat.processors.pipeline import Decoded, Handler
from minichat.processors.records import Output, SourceRecord
from minichat.storage.rebuild import decisions_present, parked_of_batch, turn_fingerprints
from minichat.storage.recorded import lookup_recorded

RecordId = tuple[str, int, int]
"""(topic, partition, offset)"""

APPLIED = "applied"
DECIDED_AFRESH = "decided afresh"
"""A command applied with no recorded decision in `turn-decisions`: the rebuild decided it."""
UNCHANGED = "unchanged"
PARKED = "parked"


@dataclass
class RebuildSummary:
    read: int = 0
    applied: int = 0
    already_applied: int = 0
    parked: int = 0
    dead_lettered: int = 0
    decisions_discarded: int = 0
    decided_afresh: int = 0
    in_recorded_order: int = 0
    """Records applied in the order `order-log` recorded (the rest: in the timestamp merge)."""
    alerts_recorded: int = 0
    """Alerts of `quota-alerts` stored as recorded (0 over the live database: it holds them)."""
    alerts_ignored: int = 0
    """Records of `quota-alerts` that are not valid alerts."""
    parked_at_start: int = 0
    parked_at_end: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    read_by_topic: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.read / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rate": round(self.rate, 1)}

    def lines(self) -> list[str]:
        return [
            f"replay: {self.read} records in {self.elapsed_s:.1f} s ({self.rate:.0f} records/s, "
            f"{self.batches} batches)",
            f"  applied          {self.applied:>9}  changed the state",
            f"  already applied  {self.already_applied:>9}  changed nothing",
            f"  parked           {self.parked:>9}  waited for their command "
            f"(still parked: {self.parked_at_end}, at start: {self.parked_at_start})",
            f"  dead-lettered    {self.dead_lettered:>9}  not re-sent",
            f"  decisions        {self.decisions_discarded:>9}  not re-sent",
            f"  decided afresh   {self.decided_afresh:>9}  commands with no recorded decision",
            f"  recorded order   {self.in_recorded_order:>9}  applied in the order the workers recorded",
            f"  recorded alerts  {self.alerts_recorded:>9}  stored as recorded on quota-alerts"
            + (f" ({self.alerts_ignored} records not valid alerts, ignored)" if self.alerts_ignored else ""),
        ]

    def count(
        self, records: Sequence[SourceRecord], outcomes: Mapping[RecordId, str], dead: set[RecordId]
    ) -> None:
        """Tally one applied batch; a record missing from `outcomes` changed nothing."""
        self.batches += 1
        for record in records:
            rid = record_id(record)
            self.read += 1
            self.read_by_topic[record.topic] = self.read_by_topic.get(record.topic, 0) + 1
            outcome = outcomes.get(rid, UNCHANGED)
            if rid in dead:
                self.dead_lettered += 1
            elif outcome in (APPLIED, DECIDED_AFRESH):
                self.applied += 1
                self.decided_afresh += outcome == DECIDED_AFRESH
            elif outcome == PARKED:
                self.parked += 1
            else:
                self.already_applied += 1


def record_id(record: SourceRecord) -> RecordId:
    return (record.topic, record.partition, record.offset)


@dataclass
class CommandOutcomes:
    """Wraps the turn-requests handler: a command is applied when its decision row is new, and
    decided afresh when it creates a turn and `turn-decisions` had no decision of it."""

    inner: Handler[TurnRequestEvent]
    outcomes: dict[RecordId, str] = field(default_factory=dict)
    tenants: set[uuid.UUID] = field(default_factory=set)
    """Every tenant a command was read of (`minichat policy diff` reports on each)."""

    async def __call__(
        self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnRequestEvent]]
    ) -> list[Output]:
        keys = [(d.event.tenant_id, d.event.chat_id, command_id_of(d.event)) for d in batch]
        unique = sorted(set(keys))
        self.tenants.update(key[0] for key in unique)
        before = await decisions_present(con, unique)
        outputs = await self.inner(con, batch)
        after = await decisions_present(con, unique)
        new_keys = [k for k in unique if k[1:] in after and k[1:] not in before]
        recorded = await lookup_recorded(con, new_keys) if new_keys else {}
        outcomes: dict[RecordId, str] = {}
        counted: set[tuple[uuid.UUID, uuid.UUID]] = set()
        for item, (_, chat_id, command_id) in zip(batch, keys, strict=True):
            key = (chat_id, command_id)
            new = key in after and key not in before and key not in counted
            counted.add(key)
            # Only a turn-creating command follows a recorded decision; a delete's is not
            # recorded for a rebuild (no policy decides it), so it is never "decided afresh".
            creates = isinstance(item.event, TurnRequested | TurnRetry | TurnEdit)
            applied = DECIDED_AFRESH if creates and key not in recorded else APPLIED
            outcomes[record_id(item.record)] = applied if new else UNCHANGED
        self.outcomes.update(outcomes)  # reset per batch attempt by the caller
        return outputs


@dataclass
class TurnEventOutcomes:
    """Wraps a provider/usage handler: an event is applied when its turn's row changed in the batch
    (the row as the digest covers it), parked when it sits in `parked_events` after the batch."""

    inner: Handler[TurnEvent]
    turn_row_sql: str
    outcomes: dict[RecordId, str] = field(default_factory=dict)

    async def __call__(self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnEvent]]) -> list[Output]:
        turns = sorted({(d.event.tenant_id, d.event.chat_id, d.event.request_id) for d in batch})
        before = await turn_fingerprints(con, self.turn_row_sql, turns)
        outputs = await self.inner(con, batch)
        after = await turn_fingerprints(con, self.turn_row_sql, turns)
        keys = [(d.event.tenant_id, d.record.topic, d.record.partition, d.record.offset) for d in batch]
        parked = await parked_of_batch(con, keys)
        outcomes: dict[RecordId, str] = {}
        for item in batch:
            rid = record_id(item.record)
            turn = (item.event.tenant_id, item.event.chat_id, item.event.request_id)
            if rid in parked:
                outcomes[rid] = PARKED
            elif after.get(turn) != before.get(turn):
                outcomes[rid] = APPLIED
            else:
                outcomes[rid] = UNCHANGED
        self.outcomes.update(outcomes)
        return outputs
