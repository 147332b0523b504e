"""The causal token `after` of a command (docs/contract.md, "Causal token `after`"), as the
ordered merge needs it (pure, no I/O).

A command naming `after: {"provider-responses": X, "usage": Y}` is held in its lane until its
partition set has applied the record at offset X of `provider-responses[p]` (and Y of `usage[p]`),
or until that lane's end offset, read after the command arrived, is at or below the offset: the
record does not exist, the lane is caught up to its end, and waiting longer could only deadlock.
A gateway producing with `acks=all` has its acknowledged record below the end offset before it
can send the command, so the second case is for tokens that name nothing (a wrong partition, a
deleted log); it is counted (`minichat_after_satisfied_by_end_total`).

The requirement is read from the record's bytes when the record enters its lane; a value that
would not decode (dead-lettered later) names nothing and is not held.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

from minichat.models.topics import TopicNames
from minichat.processors.records import SourceRecord

AFTER_COMMANDS = frozenset({"turn.requested", "turn.retry", "turn.edit"})
AFTER_TOPICS = {"provider-responses": "provider_responses", "usage": "usage"}
"""Contract key of `after` -> attribute of `TopicNames`."""

Met = Literal["offset", "end"]

_AFTER_OBJECT = re.compile(rb'"after"\s*:\s*\{')
"""A key `after` with an object value (in JSON text a `"` inside a string is escaped, so content
never matches)."""


def met(offset: int, applied_below: int, end: int | None) -> Met | None:
    """Is a named offset satisfied? `applied_below`: every record of the lane below it has been
    applied (the next offset the lane will hand out); `end`: the lane's end offset as read after
    the command arrived (None: not read since). 'offset' once the record at `offset` is applied,
    'end' when the lane's end is at or below `offset` (nothing there to wait for), else None."""
    if applied_below > offset:
        return "offset"
    if end is not None and end <= offset:
        return "end"
    return None


def after_offsets(value: bytes) -> dict[str, int]:
    """The contract keys and offsets a command's `after` names ({} for none, or for anything the
    codec would refuse: such a record is dead-lettered, not held)."""
    if _AFTER_OBJECT.search(value) is None:  # cheap: most commands carry no token
        return {}
    try:
        event = json.loads(value)
    except ValueError:
        return {}
    if not isinstance(event, dict) or event.get("type") not in AFTER_COMMANDS:
        return {}
    after = event.get("after")
    if not isinstance(after, dict) or not set(after) <= set(AFTER_TOPICS):
        return {}
    named = {key: offset for key, offset in after.items() if offset is not None}
    if not all(type(offset) is int and offset >= 0 for offset in named.values()):
        return {}
    return named


def needs_of(names: TopicNames) -> Callable[[SourceRecord], Mapping[str, int]]:
    """For the merge: a record's requirement as {topic: offset} (commands of `turn-requests`)."""
    topics = {key: getattr(names, attr) for key, attr in AFTER_TOPICS.items()}
    commands = names.turn_requests

    def needs(record: SourceRecord) -> Mapping[str, int]:
        if record.topic != commands:
            return {}
        return {topics[key]: offset for key, offset in after_offsets(record.value).items()}

    return needs


MET_METRICS: dict[Met, str] = {
    "offset": "minichat_after_satisfied_by_offset_total",
    "end": "minichat_after_satisfied_by_end_total",
}


class _Counts(Protocol):
    def inc(self, name: str, amount: int = 1, **labels: str | None) -> None: ...


def counter(metrics: _Counts, label: Callable[[str], str]) -> Callable[[str, Met], None]:
    """The merge's `on_met` for the worker: each named offset met, by topic and how."""

    def count(topic: str, how: Met) -> None:
        metrics.inc(MET_METRICS[how], topic=label(topic))

    return count
