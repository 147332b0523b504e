"""One merged batch of the three input topics → one transaction.

```
good, dead = decode(records)              # pydantic at the edge; bad -> dead letters
lock every request, then every user       # one global lock order for the whole transaction
steps = plan_steps(good)                  # homogeneous steps, same outcome as one by one
for step in steps:                        # admission handler or turn-events handler
    outputs += await handler(con, step)   # load state, decide with domain/, set-based writes
```
The worker wraps `apply` with its input positions (claimed and stored in the same transaction);
`minichat replay` calls it bare. Both feed it records in the merged order of `merge.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2

from minichat.domain.commands import command_id_of
from minichat.models import events
from minichat.models.events import DecodeError, TurnDelete, TurnEdit, TurnRequestEvent, TurnRetry
from minichat.models.topics import TopicNames
from minichat.processors.held import HeldTurns, holding
from minichat.processors.held import write as write_held
from minichat.processors.levels import plan_steps, split_disjoint
from minichat.processors.metrics import Metrics, records_label
from minichat.processors.pipeline import Decoded, Handler, dead_letter_for, refused_detail
from minichat.processors.records import LOG_APPEND_TIME, Output, SourceRecord
from minichat.storage.locks import lock_batch
from minichat.storage.turns import chat_owners

logger = logging.getLogger(__name__)

_PRODUCER_TIME = (
    "the record's timestamp was set by its producer (CreateTime), not by the broker (LogAppendTime): "
    "event time must not be chosen by a producer; `minichat topics create` sets the topic right"
)

COMMAND = "command"
FACT = "fact"

UserKey = tuple[UUID, UUID]


@dataclass(frozen=True)
class MergedBatches:
    """Decodes and applies merged batches; the same object serves the worker and `replay`."""

    topics: TopicNames
    turn_requests: Handler[Any]
    turn_events: Handler[Any]
    metrics: Metrics = field(default_factory=Metrics)
    placement: Placement = field(default_factory=lambda: Placement())
    """Where each input topic's records belong (`wrong_partition`); the worker and a rebuild tell it
    the partition counts."""
    hold_turns: bool = True
    """Hold a batch's turns between its steps and write each once (processors/held.py); False:
    each step writes its turns (a rebuild, `tools/rebuild`, counts each handler's effect on rows)."""

    def _decoder(self, topic: str) -> Callable[[bytes | None, bytes], Any]:
        if topic == self.topics.turn_requests:
            return events.decode_turn_request
        if topic == self.topics.provider_responses:
            return events.decode_provider_event
        return events.decode_usage_event

    def decode(self, records: Sequence[SourceRecord]) -> list[Decoded[Any] | Output]:
        """Per record, in order: the decoded event, or its dead letter."""
        return [self._decode_one(record) for record in records]

    def _decode_one(self, record: SourceRecord) -> Decoded[Any] | Output:
        if record.timestamp_type != LOG_APPEND_TIME:
            return self.dead_letter(record, DecodeError("timestamp_type", _PRODUCER_TIME))
        try:
            event = self._decoder(record.topic)(record.key, record.value)
        except DecodeError as error:
            return self.dead_letter(record, error)
        # After decoding: a record with a bad key or value keeps its own code, and the key is
        # then the chat id, whose partition every one of minichat's outputs for the chat takes.
        misplaced = self.placement.misplaced(record)
        if misplaced is not None:
            return self.dead_letter(record, DecodeError("wrong_partition", misplaced))
        return Decoded(record, event)

    def dead_letter(self, record: SourceRecord, error: DecodeError) -> Output:
        logger.warning("dead-letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error.code)
        self.metrics.inc("minichat_dead_letters_total", topic=self.label(record.topic), code=error.code)
        return dead_letter_for(record, error, self.topics.dead_letters)

    def refused(self, record: SourceRecord, exc: BaseException) -> Output:
        """The dead letter of a record PostgreSQL refused (isolated from its batch)."""
        return self.dead_letter(record, DecodeError("unprocessable", refused_detail(exc)))

    async def owners(self, con: asyncpg.Connection, good: Sequence[Decoded[Any]]) -> dict[UUID, UserKey]:
        """chat id → (tenant, owner) of the chats the facts of `good` name: whose quota rows they
        can settle. An owner never changes, so it may be read before the batch's transaction."""
        facts = {
            (d.event.tenant_id, d.event.chat_id) for d in good if d.record.topic != self.topics.turn_requests
        }
        return await chat_owners(con, facts)

    async def apply(
        self,
        con: asyncpg.Connection,
        good: Sequence[Decoded[Any]],
        owners: Mapping[UUID, UserKey] | None = None,
    ) -> list[Output]:
        """Apply decoded records (merged order) inside the caller's transaction. `owners`: what
        `self.owners` read for a batch these records are part of (read here, by the statement that
        takes the batch's locks, when not given)."""
        if not good:
            return []
        commands = [d for d in good if d.record.topic == self.topics.turn_requests]
        facts = [d for d in good if d.record.topic != self.topics.turn_requests]
        owners = await self._lock(con, commands, facts, owners)
        claimants: dict[UUID, set[UserKey]] = {}
        for d in commands:
            claimants.setdefault(d.event.chat_id, set()).add((d.event.tenant_id, d.event.user_id))
        for d in facts:
            owner = owners.get(d.event.chat_id)
            if owner is not None:
                claimants.setdefault(d.event.chat_id, set()).add(owner)

        def kind(d: Decoded[Any]) -> str:
            return COMMAND if d.record.topic == self.topics.turn_requests else FACT

        def keys(d: Decoded[Any]) -> Iterable[Hashable]:
            # A user's quota rows order records within one partition set only: the contract orders
            # each set as one stream and nothing across sets (two workers interleave them freely).
            # (Keys are ints and strings: a UUID's hash and equality run in Python, ints' do not.)
            event, partition = d.event, d.record.partition
            yield event.chat_id.int
            if kind(d) == COMMAND:
                if _reserves(event):
                    yield (partition, event.tenant_id.int, event.user_id.int)
            elif event.type != "turn.progress":
                yield from ((partition, t.int, u.int) for t, u in claimants.get(event.chat_id, ()))

        outputs: list[Output] = []
        steps = plan_steps(good, kind, keys)
        self.metrics.inc("minichat_batch_steps_total", len(steps))
        held = HeldTurns() if self.hold_turns else None
        with holding(held):
            for step in steps:
                handler = self.turn_requests if step.kind == COMMAND else self.turn_events
                outputs.extend(await handler(con, step.items))
            if held is not None:
                await write_held(con, held.take())
        return outputs

    @staticmethod
    async def _lock(
        con: asyncpg.Connection,
        commands: Sequence[Decoded[Any]],
        facts: Sequence[Decoded[Any]],
        owners: Mapping[UUID, UserKey] | None,
    ) -> Mapping[UUID, UserKey]:
        """One lock order for the whole transaction: every request, then every user (the owners of
        the chats the facts name are read by the same statement, unless given). The handlers take
        the same locks again per step, which no longer waits. A retry, edit or delete also locks
        the turn it targets: every turn row is then locked only under its request's lock, which
        each transaction takes up front in one order. Returns the owners."""
        users = {(d.event.tenant_id, d.event.user_id) for d in commands}
        if owners is not None:
            users.update(o for d in facts if (o := owners.get(d.event.chat_id)) is not None)
        found = await lock_batch(
            con,
            {(d.event.chat_id, command_id_of(d.event)) for d in commands}
            | {(d.event.chat_id, d.event.request_id) for d in commands if _targets_a_turn(d.event)}
            | {(d.event.chat_id, d.event.request_id) for d in facts},
            users,
            () if owners is not None else {(d.event.tenant_id, d.event.chat_id) for d in facts},
        )
        return found if owners is None else owners

    def split(
        self, good: Sequence[Decoded[Any]], owners: Mapping[UUID, UserKey], parts: int
    ) -> list[list[Decoded[Any]]]:
        """Groups of `good` that share no chat and no user (`levels.split_disjoint`): applied in
        concurrent transactions they end as the batch applied in one, and wait on no lock of each
        other. The users are those `apply` locks: every requester, and the owner of every chat a
        fact names (`owners`), whichever partition it is on. A chat created meanwhile is created by
        a command of this batch, which its chat key already joins."""

        def keys(d: Decoded[Any]) -> Iterable[Hashable]:
            event = d.event
            yield event.chat_id.int
            if d.record.topic == self.topics.turn_requests:
                yield (event.tenant_id.int, event.user_id.int)
            owner = owners.get(event.chat_id)
            if owner is not None:
                yield (owner[0].int, owner[1].int)

        return split_disjoint(good, keys, parts)

    def count_applied(
        self, good: Sequence[Decoded[Any]], dead: int, *, statements: int | None = None
    ) -> None:
        """Count an applied batch; `statements`: what its transaction(s) sent (when counted)."""
        by_topic: dict[str, int] = {}
        for d in good:
            by_topic[d.record.topic] = by_topic.get(d.record.topic, 0) + 1
        for topic, n in by_topic.items():
            self.metrics.inc("minichat_records_total", n, topic=self.label(topic), outcome="applied")
        if dead:
            self.metrics.inc("minichat_records_total", dead, topic="all", outcome="dead_letter")
        self.metrics.inc("minichat_batches_total", agent="engine")
        self.metrics.inc("minichat_batch_records_total", len(good) + dead)
        self.metrics.observe("minichat_batch_size_records", (len(good) + dead,))
        if statements is not None:
            records = records_label(len(good) + dead)
            self.metrics.observe("minichat_batch_statements", (statements,), records=records)

    def label(self, topic: str) -> str:
        """A metric label: the topic without the deployment's prefix (`turn_requests`)."""
        return topic.removeprefix(self.topics.prefix).replace("-", "_")


class Placement:
    """Kafka's default partitioner (murmur2 of the key, as `partitioning.KeyedPartitioner` puts
    minichat's own records) checked against where an input record sits. A gateway on librdkafka's
    default (CRC32, `consistent_random`) puts a chat elsewhere: its decisions and the watchdog's
    events would then take another partition set, with no order between them. Hashes are kept per
    key (keys repeat), so the check costs a dict lookup per record."""

    def __init__(self, max_keys: int = 200_000) -> None:
        self.partitions: dict[str, int] = {}
        """Partition count of each input topic (full name); a topic not in it is not checked."""
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys

    def learn(self, partitions: Iterable[TopicPartition]) -> None:
        """Every partition of the input topics (a rebuild's list): their counts."""
        for tp in partitions:
            self.partitions[tp.topic] = max(self.partitions.get(tp.topic, 0), tp.partition + 1)

    def misplaced(self, record: SourceRecord) -> str | None:
        """The dead letter's detail when `record` sits on another partition than its key's."""
        count = self.partitions.get(record.topic)
        key = record.key
        if count is None or key is None:
            return None
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        expected = hashed % count
        if record.partition == expected:
            return None
        return (
            f"the record is on partition {record.partition}, its key's is {expected} (murmur2 of the key "
            f"modulo {count} partitions): the producer must use Kafka's default partitioner "
            "(librdkafka: partitioner=murmur2_random)"
        )


def _targets_a_turn(event: TurnRequestEvent) -> bool:
    return isinstance(event, TurnRetry | TurnEdit | TurnDelete)


def _reserves(event: TurnRequestEvent) -> bool:
    return not isinstance(event, TurnDelete) and event.type != "chat.delete"
