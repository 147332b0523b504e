"""The causal token `after`: its model, its gating rule (pure) and the merge holding a command on it."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from minichat.models import events
from minichat.models.events.codec import DecodeError, decode_turn_request
from minichat.models.topics import TopicNames
from minichat.processors.causal import after_offsets, met, needs_of
from minichat.processors.merge import OrderedMerge
from minichat.processors.records import SourceRecord, timestamp_from_ms

NAMES = TopicNames("t.")
PR, US, TR = NAMES.provider_responses, NAMES.usage, NAMES.turn_requests


def command(kind: str = "turn.requested", after: Any = None, **extra: Any) -> dict[str, Any]:
    chat = uuid.uuid4()
    event: dict[str, Any] = {
        "type": kind,
        "event_id": str(uuid.uuid4()),
        "schema_version": 1,
        "occurred_at": "2025-01-01T00:00:00Z",
        "tenant_id": str(uuid.uuid4()),
        "chat_id": str(chat),
        "user_id": str(uuid.uuid4()),
        "request_id": str(uuid.uuid4()),
    }
    if kind == "turn.requested":
        event["content"] = "hi"
    else:
        event["new_request_id"] = str(uuid.uuid4())
        if kind == "turn.edit":
            event["content"] = "edited"
    if after is not None:
        event["after"] = after
    event.update(extra)
    return event


def decoded(event: dict[str, Any]) -> Any:
    return decode_turn_request(event["chat_id"].encode(), json.dumps(event).encode())


# ------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("kind", ["turn.requested", "turn.retry", "turn.edit"])
def test_after_is_optional_and_named_with_the_topics_names(kind: str) -> None:
    assert decoded(command(kind)).after is None
    assert decoded(command(kind, after=None)).after is None
    token = decoded(command(kind, after={"provider-responses": 7, "usage": 0})).after
    assert token == events.After.of(provider_responses=7, usage=0)
    assert token.offsets() == {"provider-responses": 7, "usage": 0}
    assert decoded(command(kind, after={})).after.offsets() == {}


@pytest.mark.parametrize(
    "after",
    [
        {"provider_responses": 1},  # the Python name is not the wire name
        {"provider-responses": 1, "turn-requests": 2},
        {"usage": -1},
        {"usage": 1.0},
        {"usage": True},
        {"usage": "3"},
        [1],
        7,
    ],
)
def test_a_malformed_after_is_a_schema_violation(after: Any) -> None:
    with pytest.raises(DecodeError) as caught:
        decoded(command(after=after))
    assert caught.value.code == "schema_violation"
    assert "after" in caught.value.detail


def test_the_token_round_trips_through_the_codec_under_its_wire_names() -> None:
    event = decoded(command("turn.edit")).model_copy(update={"after": events.After.of(usage=4)})
    wire = json.loads(events.to_json_bytes(event))
    assert wire["after"] == {"provider-responses": None, "usage": 4}
    assert "after" not in json.loads(events.to_json_bytes(decoded(command())))  # none: not sent
    assert decoded(wire).after == events.After.of(usage=4)


# ---------------------------------------------------------------------------- the gating rule


def test_an_offset_is_met_once_the_record_at_it_is_applied() -> None:
    assert met(5, applied_below=5, end=None) is None  # offset 5 not applied yet
    assert met(5, applied_below=6, end=None) == "offset"
    assert met(5, applied_below=6, end=3) == "offset"  # applied wins over the end


def test_an_offset_at_or_past_the_lanes_end_is_met_by_the_end() -> None:
    assert met(5, applied_below=2, end=5) == "end"  # no record at 5: the lane ends before it
    assert met(9, applied_below=2, end=6) == "end"
    assert met(5, applied_below=2, end=6) is None  # the record exists: wait for it


def test_the_requirement_is_read_from_the_bytes_and_anything_the_codec_refuses_names_nothing() -> None:
    def raw(event: Any) -> bytes:
        return json.dumps(event).encode()

    assert after_offsets(raw(command(after={"provider-responses": 3}))) == {"provider-responses": 3}
    assert after_offsets(raw(command("turn.retry", after={"usage": 0, "provider-responses": None}))) == {
        "usage": 0
    }
    assert after_offsets(raw(command())) == {}
    assert after_offsets(raw(command(after={"usage": -1}))) == {}
    assert after_offsets(raw(command(after={"usage": 1, "x": 2}))) == {}
    assert after_offsets(raw(command(after=[1]))) == {}
    assert after_offsets(raw({**command(), "type": "turn.delete", "after": {"usage": 1}})) == {}
    assert after_offsets(b'{"after": ') == {}
    assert after_offsets(raw(command(content='quoting "after": {"usage": 1}'))) == {}
    assert after_offsets(b'{"type": "turn.edit", "after" :\n {"usage": 2}}') == {"usage": 2}


# ---------------------------------------------------------------------------- the merge


def rec(topic: str, offset: int, ms: int, after: dict[str, int] | None = None) -> SourceRecord:
    value = json.dumps(command(after=after)).encode() if topic == TR else b"{}"
    return SourceRecord(topic, 0, offset, b"k", value, timestamp_from_ms(ms))


def ids(records: list[SourceRecord]) -> list[tuple[str, int]]:
    return [(r.topic, r.offset) for r in records]


def merge_at(start: int = 0) -> tuple[OrderedMerge, list[tuple[str, str]]]:
    heard: list[tuple[str, str]] = []
    merge = OrderedMerge.of_inputs(NAMES, lambda topic, how: heard.append((topic, how)))
    for topic in (PR, US, TR):
        merge.open(topic, 0, start)
    return merge, heard


def test_a_command_sorting_before_the_fact_it_names_waits_for_it_and_the_records_behind_it_too() -> None:
    merge, heard = merge_at()
    # the command (1000) sorts before the terminal event (1005) it names: clock skew between brokers
    merge.add([rec(TR, 0, 1000, {"provider-responses": 0}), rec(TR, 1, 1001)])
    merge.add([rec(US, 0, 1002)])
    tick = merge.tick()
    merge.end_read(PR, 0, 1, tick)  # the end read after the command arrived: offset 0 exists
    merge.caught_up(PR, 0, 999)
    merge.caught_up(US, 0, 2000)
    assert ids(merge.release(10)) == []  # the usage record waits for the provider lane's frontier
    assert merge.blocked_lanes() == [(PR, 0)]
    merge.add([rec(PR, 0, 1005)])
    merge.caught_up(PR, 0, 2000)
    # the usage record (1002) and the terminal event (1005) first, then the command, then the one behind
    assert ids(merge.release(10)) == [(US, 0), (PR, 0), (TR, 0), (TR, 1)]
    assert heard == [(PR, "offset")]


def test_without_a_token_the_same_records_go_in_timestamp_order() -> None:
    merge, heard = merge_at()
    merge.add([rec(TR, 0, 1000), rec(TR, 1, 1001), rec(PR, 0, 1005), rec(US, 0, 1002)])
    for topic in (PR, US, TR):
        merge.caught_up(topic, 0, 2000)
    assert ids(merge.release(10)) == [(TR, 0), (TR, 1), (US, 0), (PR, 0)]
    assert heard == []


def test_a_held_command_asks_for_the_end_of_the_lane_it_waits_on_and_an_end_before_it_releases_it() -> None:
    merge, heard = merge_at()
    merge.add([rec(TR, 0, 1000, {"usage": 50}), rec(TR, 1, 1001)])
    merge.caught_up(PR, 0, 5000)
    merge.caught_up(US, 0, 5000)
    assert merge.release(10) == []  # held: no end read since it arrived
    assert merge.blocked_lanes() == [(US, 0)]
    merge.end_read(US, 0, 50, merge.tick())  # offset 50 does not exist: the lane is at its end
    assert ids(merge.release(10)) == [(TR, 0), (TR, 1)]
    assert heard == [(US, "end")]


def test_an_end_read_before_the_command_arrived_does_not_release_it() -> None:
    merge, heard = merge_at()
    stale = merge.tick()  # a ListOffsets sent before the command was fetched
    merge.add([rec(TR, 0, 1000, {"provider-responses": 0})])
    merge.end_read(PR, 0, 0, stale)  # ...answered "empty": says nothing of the acknowledged record
    merge.caught_up(PR, 0, 5000)
    merge.caught_up(US, 0, 5000)
    assert merge.release(10) == []
    assert merge.blocked_lanes() == [(PR, 0)]
    merge.end_read(PR, 0, 1, merge.tick())  # read again: the record is there, so wait for it
    assert merge.release(10) == []
    assert merge.blocked_lanes() == []  # nothing to ask: the fetch brings it
    merge.add([rec(PR, 0, 1010)])
    assert ids(merge.release(10)) == [(PR, 0), (TR, 0)]
    assert heard == [(PR, "offset")]


def test_an_offset_applied_before_the_lane_opened_is_met_at_once() -> None:
    merge, heard = merge_at(start=10)
    merge.add([rec(TR, 10, 1000, {"provider-responses": 9, "usage": 3})])
    merge.caught_up(PR, 0, 5000)
    merge.caught_up(US, 0, 5000)
    assert ids(merge.release(10)) == [(TR, 10)]
    assert sorted(heard) == [(PR, "offset"), (US, "offset")]


def test_both_offsets_must_be_met() -> None:
    merge, _ = merge_at()
    merge.add([rec(TR, 0, 1000, {"provider-responses": 0, "usage": 0})])
    merge.end_read(PR, 0, 1, merge.tick())
    merge.end_read(US, 0, 1, merge.tick())
    merge.add([rec(PR, 0, 1001)])
    merge.caught_up(PR, 0, 5000)
    merge.caught_up(US, 0, 5000)
    assert ids(merge.release(10)) == [(PR, 0)]
    merge.add([rec(US, 0, 1002)])
    assert ids(merge.release(10)) == [(US, 0), (TR, 0)]


def test_a_rebuild_with_ends_known_for_good_keeps_a_token_past_the_end_in_timestamp_order() -> None:
    merge, heard = merge_at()
    for topic, end in ((PR, 2), (US, 0), (TR, 2)):
        merge.end_read(topic, 0, end, math.inf)
    merge.add([rec(TR, 0, 1000, {"provider-responses": 7}), rec(TR, 1, 1003)])
    merge.add([rec(PR, 0, 999), rec(PR, 1, 1002)])
    for topic in (PR, US, TR):
        merge.exhausted(topic, 0)
    assert ids(merge.release(10)) == [(PR, 0), (TR, 0), (PR, 1), (TR, 1)]
    assert heard == [(PR, "end")]


def test_the_worker_needs_only_turn_requests_tokens() -> None:
    needs = needs_of(NAMES)
    assert needs(rec(TR, 0, 1, {"usage": 4})) == {US: 4}
    value = json.dumps(command(after={"usage": 4})).encode()
    fact = SourceRecord(PR, 0, 0, b"k", value, timestamp_from_ms(1))
    assert needs(fact) == {}
