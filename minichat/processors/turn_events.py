"""The provider-responses and usage agents: turns finish once, settle once, bill once.

Both topics join their turn by `(chat_id, request_id)`. Events of a request not decided yet are
parked and applied by the turn-requests agent right after it decides (same locks, same order).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg

from minichat.domain.alerts import AlertStep, alert_floor, crossings
from minichat.domain.ids import alert_event_id
from minichat.domain.quota import BUCKET_TOTAL, EMPTY_ROW, QuotaDelta, limit_for
from minichat.domain.spend import ModelFigures, add_model_figures
from minichat.domain.turns import (
    AssistantMessage,
    Billing,
    Step,
    TurnEvent,
    TurnRecord,
    apply_event,
    billing_fields,
    billing_json,
)
from minichat.models.events import DecodeError, QuotaThresholdCrossed
from minichat.models.policy import Policy
from minichat.processors.held import HeldTurns, current, with_usage
from minichat.processors.metrics import Metrics
from minichat.processors.pipeline import Decoded, dead_letter_for
from minichat.processors.records import Output, SourceRecord
from minichat.storage.alerts import AlertRow, alert_row, insert_alerts
from minichat.storage.locks import RequestKey
from minichat.storage.outbox import OutboxEntry
from minichat.storage.policies import PolicySnapshots
from minichat.storage.quota_deltas import AlertCandidate, QuotaSlot
from minichat.storage.turns import Found, Parked, TurnWrite, load_turns, write_events

logger = logging.getLogger(__name__)

Item = tuple[SourceRecord, TurnEvent]


@dataclass
class _Effects:
    """Everything one batch writes, accumulated in event order."""

    turns: dict[int, TurnWrite] = field(default_factory=dict)
    """By turn (`id.int`, as every dict here: cheaper to hash than a UUID)."""
    messages: dict[int, AssistantMessage] = field(default_factory=dict)
    """The assistant messages this batch inserts, by turn."""
    message_usage: dict[int, TurnRecord] = field(default_factory=dict)
    """Turns whose stored assistant message takes the usage reported for them."""
    deltas: dict[QuotaSlot, tuple[QuotaDelta, datetime]] = field(default_factory=dict)
    by_model: dict[QuotaSlot, ModelFigures] = field(default_factory=dict)
    """The daily `total` rows' share of `deltas` by the model charged (the spend report's split)."""
    outbox: list[OutboxEntry] = field(default_factory=list)
    alert_steps: dict[QuotaSlot, list[AlertStep]] = field(default_factory=dict)
    """Each row's spend changes, in applied order, with their turns' alert terms."""
    alert_margins: dict[QuotaSlot, int] = field(default_factory=dict)
    """Per row, the least (alert floor − spend added so far) over its steps: the row may have
    crossed a threshold in this batch only if its spend after the batch reaches this + the
    batch's spend on it."""
    parked: list[Parked] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    unknown_codes: Counter[str] = field(default_factory=Counter)
    """Turns settled `failed`/`estimated` for a `turn.failed` code the contract does not name."""


async def apply_turn_events(
    con: asyncpg.Connection,
    items: Sequence[Item],
    snapshots: PolicySnapshots,
    dead_letters_topic: str,
    metrics: Metrics,
    *,
    park_unknown: bool = True,
) -> list[Output]:
    """Apply provider/usage events in order; the caller holds the request locks of every item.

    An event whose request has nothing stored is parked until its command is decided, unless
    `park_unknown` is False: the drain after a decision, where nothing stored means the command
    was answered for another tenant's chat (nothing is stored under a foreign key), so the events
    could never apply; they are dropped (`foreign_chat`) rather than parked again forever."""
    began = time.perf_counter()
    held = current()
    keys = {(e.tenant_id, e.chat_id, e.request_id) for _, e in items}
    found = await load_turns(con, keys) if held is None else await _held_turns(con, held, keys)
    versions = {f.turn.policy_version_applied for f in found.values() if f.turn is not None}
    policies = {version: await snapshots.get(con, version) for version in versions}
    loaded = time.perf_counter()
    effects, outputs = fold_events(found, items, policies, dead_letters_topic, park_unknown=park_unknown)
    decided = time.perf_counter()
    await _write(con, effects, held)
    stages = {"load": loaded - began, "decide": decided - loaded, "write": time.perf_counter() - decided}
    _count(metrics, effects, stages, dead_letters=len(outputs))
    return outputs


async def _held_turns(
    con: asyncpg.Connection, held: HeldTurns, keys: set[tuple[UUID, UUID, UUID]]
) -> dict[tuple[UUID, RequestKey], Found]:
    """`load_turns` through the batch's held turns: a held turn is read from there (it may not be
    stored yet, or be stored as it was before this batch); the others are loaded and held."""
    found: dict[tuple[UUID, RequestKey], Found] = {}
    missing = []
    for key in keys:
        tenant, chat, request = key
        h = held.get(chat, request)
        if h is None:
            missing.append(key)
        else:
            same = h.turn.tenant_id == tenant
            found[(tenant, (chat, request))] = Found(h.turn if same else None, same)
    if missing:
        loaded = await load_turns(con, missing)
        for f in loaded.values():
            if f.turn is not None:
                held.hold(f.turn)
        found.update(loaded)
    return found


def fold_events(
    found: dict[tuple[UUID, RequestKey], Found],
    items: Sequence[Item],
    policies: Mapping[int, Policy],
    dead_letters_topic: str,
    *,
    park_unknown: bool = True,
) -> tuple[_Effects, list[Output]]:
    """The events applied in order to the turns `load_turns` found (`found`: this batch's own
    objects, changed in place, one working turn per request), under each turn's policy snapshot
    (`policies`, by version): the batch's writes and its dead letters. No I/O."""
    effects = _Effects()
    outputs: list[Output] = []
    # Keyed by the ids' integers: a UUID's hash and equality run in Python, an int's do not.
    by_ints = {(tenant.int, chat.int, request.int): f for (tenant, (chat, request)), f in found.items()}
    for record, event in items:
        stored = by_ints.get((event.tenant_id.int, event.chat_id.int, event.request_id.int))
        if stored is None:
            if park_unknown:
                effects.parked.append(_parked(record, event))
            else:
                effects.dropped["foreign_chat"] += 1
        elif not stored.same_tenant:
            outputs.append(_tenant_mismatch(record, dead_letters_topic))
        elif stored.turn is None:
            effects.dropped["request_rejected"] += 1
        else:
            turn = stored.turn
            policy = policies[turn.policy_version_applied]
            step = apply_event(turn, event, record.timestamp, record.offset, policy, own=True)
            if step.changed:
                _add_step(effects, turn.id.int, step, policy)
            else:
                effects.dropped[step.dropped or "unchanged"] += 1
    return effects, outputs


def _add_step(effects: _Effects, turn_id: int, step: Step, policy: Policy) -> None:
    """One applied event's writes, folded into the batch's (a turn is written once, as it ends up)."""
    previous = effects.turns.get(turn_id)
    if previous is None:
        effects.turns[turn_id] = TurnWrite(step.turn, step.progressed, step.awaiting_usage)
    elif (
        previous.turn is not step.turn
        or (step.progressed and not previous.progressed)
        or (step.awaiting_usage and not previous.awaiting_usage)
    ):
        effects.turns[turn_id] = TurnWrite(
            step.turn,
            progressed=step.progressed or previous.progressed,
            awaiting_usage=step.awaiting_usage or previous.awaiting_usage,
        )
    if step.message is not None:
        effects.messages[turn_id] = step.message
    if step.message_usage:
        inserting = effects.messages.get(turn_id)
        if inserting is not None:  # completed in this batch too: inserted with the usage already
            effects.messages[turn_id] = with_usage(inserting, step.turn.usage)
        else:
            effects.message_usage[turn_id] = step.turn
    if step.billing is not None:
        _add_billing(effects, step.turn, step.billing, policy)
        if step.billing.kind == "usage.settled" and step.billing.settlement.unknown_error_code:
            effects.unknown_codes[step.turn.error_code or ""] += 1


def _count(metrics: Metrics, effects: _Effects, stages: dict[str, float], *, dead_letters: int) -> None:
    for stage, seconds in stages.items():
        metrics.observe("minichat_batch_stage_seconds", (seconds,), stage=stage, step="facts")
    for reason, count in effects.dropped.items():
        metrics.inc("minichat_turn_events_dropped_total", count, reason=reason)
    metrics.inc("minichat_events_parked_total", len(effects.parked))
    for code, count in effects.unknown_codes.items():
        metrics.count_unknown_code(code, count)
    if dead_letters:
        metrics.inc("minichat_dead_letters_total", dead_letters, topic="turn_events", code="tenant_mismatch")


def _add_billing(effects: _Effects, turn: TurnRecord, billing: Billing, policy: Policy) -> None:
    at = turn.adjusted_at if billing.kind == "usage.adjusted" else turn.settled_at
    assert at is not None
    limits, thresholds = policy.alert_terms(turn.tenant_id)
    for bucket_key, delta in billing.deltas:
        slot: QuotaSlot = (turn.tenant_id, turn.requester_user_id, bucket_key)
        total, latest = effects.deltas.get(slot, (EMPTY_ROW, at))
        total = total + delta
        effects.deltas[slot] = (total, max(latest, at))
        if bucket_key.bucket == BUCKET_TOTAL and bucket_key.period_type == "daily":
            add_model_figures(effects.by_model.setdefault(slot, {}), turn.effective_model, delta)
        spent = delta.spent_credits_micro
        if spent:
            limit = limit_for(limits, bucket_key)
            step = AlertStep(spent, limit, thresholds, turn.request_id, at)
            effects.alert_steps.setdefault(slot, []).append(step)
            floor = alert_floor(limit, thresholds)
            if floor is not None:
                margin = floor - total.spent_credits_micro
                best = effects.alert_margins.get(slot)
                if best is None or margin < best:
                    effects.alert_margins[slot] = margin
    fields = billing_fields(turn, billing)
    entry = OutboxEntry(turn.tenant_id, fields["dedupe_key"], billing.kind, billing_json(fields), at)
    effects.outbox.append(entry)


async def _write(con: asyncpg.Connection, effects: _Effects, held: HeldTurns | None) -> None:
    """The step's writes; with `held`, its turns and assistant messages go to the batch's held
    turns instead (written once, at the batch's end or before a command of their chat), while its
    quota rows, alerts and billing outbox are written now (later commands of the batch read them)."""
    turns = list(effects.turns.values())
    messages = list(effects.messages.values())
    message_usage = list(effects.message_usage.values())
    if held is not None:
        held.keep(turns, messages, message_usage)
        turns, messages, message_usage = [], [], []
    floors = {
        slot: margin + effects.deltas[slot][0].spent_credits_micro
        for slot, margin in effects.alert_margins.items()
    }
    candidates = await write_events(
        con,
        parked=effects.parked,
        messages=messages,
        turns=turns,
        message_usage=message_usage,
        deltas=effects.deltas,
        by_model=effects.by_model,
        outbox=effects.outbox,
        alert_floors=floors,
    )
    if candidates:
        await insert_alerts(con, alert_rows(effects, candidates))


def alert_rows(effects: _Effects, candidates: Sequence[AlertCandidate]) -> list[AlertRow]:
    """The thresholds the batch's steps crossed on the rows that reached their floor: each row's
    steps folded from its spend before the batch (after, less the batch's spend on it)."""
    rows: list[AlertRow] = []
    for candidate in sorted(candidates, key=lambda c: c.slot):
        tenant, user, key = slot = candidate.slot
        before = candidate.spent_credits_micro - effects.deltas[slot][0].spent_credits_micro
        for c in crossings(before, candidate.crossed, effects.alert_steps.get(slot, ())):
            event_id = alert_event_id(tenant, user, key, c.threshold_percent)
            event = QuotaThresholdCrossed(
                event_id=event_id,
                tenant_id=tenant,
                user_id=user,
                bucket=key.bucket,  # type: ignore[arg-type]
                period_type=key.period_type,
                period_start=key.period_start,
                threshold_percent=c.threshold_percent,
                limit_credits_micro=c.limit_credits_micro,
                spent_credits_micro=c.spent_credits_micro,
                request_id=c.request_id,
                occurred_at=c.occurred_at,
            )
            rows.append(alert_row(event))
    return rows


def _parked(record: SourceRecord, event: TurnEvent) -> Parked:
    return Parked(
        tenant_id=event.tenant_id,
        chat_id=event.chat_id,
        request_id=event.request_id,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        event_type=event.type,
        payload=record.value,
        record_timestamp=record.timestamp,
    )


_TENANT_MISMATCH = DecodeError(
    "tenant_mismatch", "tenant_id is not the tenant of the turn or command with this request_id"
)


def _tenant_mismatch(record: SourceRecord, dead_letters_topic: str) -> Output:
    return dead_letter_for(record, _TENANT_MISMATCH, dead_letters_topic)


@dataclass(frozen=True)
class TurnEvents:
    """Handler of a provider-responses or usage batch."""

    snapshots: PolicySnapshots
    dead_letters_topic: str
    metrics: Metrics = field(default_factory=Metrics)

    async def __call__(self, con: asyncpg.Connection, batch: Sequence[Decoded[TurnEvent]]) -> list[Output]:
        # The caller (processors.batches) holds the request and user locks of the whole batch.
        items = [(d.record, d.event) for d in batch]
        return await apply_turn_events(con, items, self.snapshots, self.dead_letters_topic, self.metrics)


def parked_items(
    parked: Sequence[Parked], decoders: dict[str, Callable[[bytes | None, bytes], TurnEvent]]
) -> list[Item]:
    """Parked records decoded again (they decoded once already, so they decode now)."""
    items: list[Item] = []
    for p in parked:
        key = str(p.chat_id).encode()
        record = SourceRecord(p.source_topic, p.partition, p.offset, key, p.payload, p.record_timestamp)
        items.append((record, decoders[p.source_topic](key, p.payload)))
    return items
