"""The applied order is a fact: how a batch's order is compacted into runs, and how a rebuild reads
the entries back (first entry wins, the range, the log's end); the end-to-end test is
tests/integration/test_order_log.py."""

from __future__ import annotations

import json

from minichat.models.events import OrderApplied
from minichat.models.topics import TopicNames
from minichat.processors.order_log import compact, entries
from minichat.processors.records import SourceRecord, timestamp_from_ms
from minichat.tools.rebuild.recorded_order import RecordedOrder, decode_order

NAMES = TopicNames("t.")
TR, PR, US = NAMES.turn_requests, NAMES.provider_responses, NAMES.usage


def rec(topic: str, partition: int, offset: int) -> SourceRecord:
    return SourceRecord(topic, partition, offset, None, b"{}", timestamp_from_ms(0))


def test_consecutive_offsets_of_one_topic_collapse_into_one_run() -> None:
    applied = [rec(TR, 0, 5), rec(TR, 0, 6), rec(TR, 0, 7), rec(PR, 0, 2), rec(US, 1, 9), rec(PR, 0, 3)]
    applied += [rec(TR, 0, 9), rec(TR, 0, 10), rec(US, 1, 10)]
    # per set: set 1's record between PR 2 and PR 3 does not break set 0's run
    assert compact(applied, NAMES.prefix) == {
        0: [("turn-requests", 5, 7), ("provider-responses", 2, 3), ("turn-requests", 9, 10)],
        1: [("usage", 9, 10)],
    }


def test_a_run_breaks_on_another_topic_or_a_gap_in_offsets() -> None:
    # topic change in between, and an offset skipped (the skipped one applied elsewhere)
    applied = [rec(TR, 0, 1), rec(PR, 0, 1), rec(TR, 0, 2), rec(TR, 0, 4)]
    assert compact(applied, NAMES.prefix)[0] == [
        ("turn-requests", 1, 1),
        ("provider-responses", 1, 1),
        ("turn-requests", 2, 2),
        ("turn-requests", 4, 4),
    ]


def test_one_entry_per_set_as_order_applied_json() -> None:
    rows = entries([rec(TR, 2, 0), rec(TR, 2, 1), rec(US, 0, 4)], NAMES.prefix)
    assert [number for number, _ in rows] == [2, 0]
    payload = json.loads(rows[0][1])
    assert payload == {
        "type": "order.applied",
        "schema_version": 1,
        "partition_set": 2,
        "runs": [["turn-requests", 0, 1]],
    }
    assert OrderApplied.model_validate_json(rows[1][1]).runs == [("usage", 4, 4)]


def drain(order: RecordedOrder, records: list[SourceRecord]) -> list[tuple[str, int]]:
    leftover = [r for r in records if not order.add(r)]
    assert not leftover
    return [(r.topic, r.offset) for r in order.release(1000)]


def test_a_rebuild_follows_the_recorded_order_and_the_first_entry_wins() -> None:
    runs = {
        0: [
            (PR, 0, 0),  # the set's first batch: provider 0, then commands 0 and 1
            (TR, 0, 1),
            (US, 0, 0),  # the next batch
            (TR, 0, 1),  # a batch re-applied after a restart names TR 0..1 again: already placed
            (PR, 0, 1),
        ]
    }
    ranges = {(TR, 0): (0, 2), (PR, 0): (0, 2), (US, 0): (0, 1)}
    order = RecordedOrder(runs, ranges)
    assert order.ends == {(TR, 0): 2, (PR, 0): 2, (US, 0): 1}
    records = [rec(TR, 0, 0), rec(TR, 0, 1), rec(PR, 0, 0), rec(PR, 0, 1), rec(US, 0, 0)]
    assert drain(order, records) == [(PR, 0), (TR, 0), (TR, 1), (US, 0), (PR, 1)]
    assert order.finished() == [(0, [])]


def test_a_record_held_back_waits_for_its_turn_in_the_recorded_order() -> None:
    # recorded: usage 0 before command 0; the command is fetched first
    order = RecordedOrder({3: [(US, 0, 0), (TR, 0, 0)]}, {(TR, 3): (0, 1), (US, 3): (0, 1), (PR, 3): (0, 0)})
    assert order.add(rec(TR, 3, 0))
    assert order.wants((US, 3)) and not order.wants((TR, 3))
    assert order.release(10) == []
    assert order.add(rec(US, 3, 0))
    assert [(r.topic, r.offset) for r in order.release(10)] == [(US, 0), (TR, 0)]
    assert not order.pending(3)


def test_past_the_order_logs_end_the_merge_takes_over() -> None:
    # TR 0..2 recorded, TR 3 not (the relay had not published it), TR 4 recorded (a gap: merged)
    runs = {0: [(TR, 0, 2), (PR, 0, 0), (TR, 4, 4)]}
    ranges = {(TR, 0): (0, 6), (PR, 0): (0, 2), (US, 0): (0, 0)}
    order = RecordedOrder(runs, ranges)
    assert order.ends == {(TR, 0): 3, (PR, 0): 1, (US, 0): 0}
    assert order.gaps == 1
    records = [rec(TR, 0, i) for i in range(6)] + [rec(PR, 0, 0), rec(PR, 0, 1)]
    assert drain(order, records) == [(TR, 0), (TR, 1), (TR, 2), (PR, 0)]
    ((number, beyond),) = order.finished()
    assert number == 0
    assert [(r.topic, r.offset) for r in beyond] == [(PR, 1), (TR, 3), (TR, 4), (TR, 5)]
    assert not order.add(rec(TR, 0, 6))  # the set is past its recorded order: to the merge


def test_only_the_rebuilds_range_counts() -> None:
    # --from-time: the range starts at TR 5; entries before it and past its end are cut off
    order = RecordedOrder({1: [(TR, 0, 9)]}, {(TR, 1): (5, 8), (PR, 1): (0, 0), (US, 1): (0, 0)})
    assert order.ends[(TR, 1)] == 8
    assert drain(order, [rec(TR, 1, i) for i in range(5, 8)]) == [(TR, 5), (TR, 6), (TR, 7)]


def test_a_set_without_entries_is_merged_from_the_start() -> None:
    order = RecordedOrder({}, {(TR, 0): (0, 3), (PR, 0): (0, 1), (US, 0): (0, 0)})
    assert not order.pending(0)
    assert not order.add(rec(TR, 0, 0))
    assert order.ends[(TR, 0)] == 0


def test_decoding_skips_what_is_not_an_order_applied_keyed_by_its_set() -> None:
    good = OrderApplied(partition_set=1, runs=[("usage", 0, 3)]).model_dump_json().encode()  # type: ignore[list-item]
    runs = decode_order(NAMES, [(b"1", good), (b"2", good), (b"1", b"{}"), (b"1", None)])
    assert runs == {1: [(US, 0, 3)]}


def test_a_split_batchs_groups_can_take_a_partition_out_of_offset_order() -> None:
    # two concurrent groups (no chat or user shared): the one holding TR 1 committed first
    order = RecordedOrder({0: [(TR, 1, 1), (TR, 0, 0)]}, {(TR, 0): (0, 2), (PR, 0): (0, 0), (US, 0): (0, 0)})
    assert drain(order, [rec(TR, 0, 0), rec(TR, 0, 1)]) == [(TR, 1), (TR, 0)]
