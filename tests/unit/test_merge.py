"""The ordered merge and the step planner: pure, no broker."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from minichat.processors.assignor import plan
from minichat.processors.levels import plan_steps, split_disjoint
from minichat.processors.merge import OrderedMerge
from minichat.processors.records import SourceRecord, timestamp_from_ms

RANKS = {"pr": 0, "us": 1, "tr": 2}


def rec(topic: str, partition: int, offset: int, ms: int) -> SourceRecord:
    return SourceRecord(topic, partition, offset, b"k", b"{}", timestamp_from_ms(ms))


def opened(*lanes: tuple[str, int]) -> OrderedMerge:
    merge = OrderedMerge(RANKS)
    for topic, partition in lanes:
        merge.open(topic, partition, 0)
    return merge


def ids(records: list[SourceRecord]) -> list[tuple[str, int, int]]:
    return [(r.topic, r.partition, r.offset) for r in records]


def test_a_command_waits_while_a_fact_partition_of_its_set_may_still_deliver_an_earlier_record() -> None:
    merge = opened(("pr", 0), ("us", 0), ("tr", 0))
    merge.add([rec("tr", 0, 0, 1000)])
    assert merge.release(10) == []
    assert merge.blocked_lanes() == [("pr", 0), ("us", 0)]
    merge.caught_up("pr", 0, 1001)
    assert merge.release(10) == []  # usage still unknown
    merge.caught_up("us", 0, 1000)  # a usage record at 1000 ranks before the command
    assert merge.release(10) == []
    merge.caught_up("us", 0, 1000.5)
    assert ids(merge.release(10)) == [("tr", 0, 0)]


def test_a_fact_of_the_same_millisecond_goes_first_and_a_command_frontier_at_the_same_ms_suffices() -> None:
    merge = opened(("pr", 0), ("us", 0), ("tr", 0))
    merge.add([rec("tr", 0, 0, 1000), rec("pr", 0, 0, 1000)])
    merge.caught_up("us", 0, 1001)
    # the provider record (rank 0) precedes the command (rank 2); the command lane waits for nothing
    # else once the provider lane's frontier passes 1000
    assert ids(merge.release(1)) == [("pr", 0, 0)]
    assert merge.release(10) == []
    merge.caught_up("pr", 0, 1000.5)
    assert ids(merge.release(10)) == [("tr", 0, 0)]
    # a fact lane whose frontier equals a later fact's timestamp does not hold back a lower rank
    merge.add([rec("pr", 0, 1, 2000)])
    merge.caught_up("us", 0, 2000)
    merge.caught_up("tr", 0, 2000)
    assert ids(merge.release(10)) == [("pr", 0, 1)]


def test_partition_sets_are_independent() -> None:
    merge = opened(*((t, p) for t in RANKS for p in (0, 1)))
    merge.add([rec("tr", 0, 0, 5), rec("tr", 1, 0, 9)])
    merge.caught_up("pr", 1, 10)
    merge.caught_up("us", 1, 10)
    assert ids(merge.release(10)) == [("tr", 1, 0)]
    assert merge.blocked_lanes() == [("pr", 0), ("us", 0)]


def test_a_set_with_a_lane_not_open_yet_releases_nothing() -> None:
    """A rebalance opens a set's lanes one by one: until all are open, nothing is known of the
    missing partition, so nothing of the set may go."""
    merge = opened(("tr", 0), ("us", 0))
    merge.add([rec("tr", 0, 0, 5)])
    merge.exhausted("us", 0)
    assert merge.release(10) == []
    merge.open("pr", 0, 0)
    merge.exhausted("pr", 0)
    assert ids(merge.release(10)) == [("tr", 0, 0)]


def test_exhausted_lanes_release_everything_in_timestamp_rank_offset_order() -> None:
    rng = random.Random(7)
    merge = opened(("pr", 0), ("us", 0), ("tr", 0))
    everything: list[SourceRecord] = []
    for topic in RANKS:
        ms = 0
        batch = []
        for offset in range(200):
            ms += rng.randint(0, 3)  # same-millisecond ties across topics are frequent
            batch.append(rec(topic, 0, offset, ms))
        merge.add(batch)
        everything.extend(batch)
    for topic in RANKS:
        merge.exhausted(topic, 0)
    out: list[SourceRecord] = []
    while chunk := merge.release(37):
        out.extend(chunk)
    expected = sorted(everything, key=lambda r: (r.timestamp_ms, RANKS[r.topic], r.offset))
    assert ids(out) == ids(expected)
    assert merge.buffered() == 0


def test_a_lane_drops_records_it_was_handed_already_and_reopening_forgets_the_buffer() -> None:
    merge = opened(("pr", 0), ("us", 0), ("tr", 0))
    merge.add([rec("pr", 0, 0, 1), rec("pr", 0, 1, 2)])
    merge.add([rec("pr", 0, 1, 2), rec("pr", 0, 2, 3)])  # a refetch overlapping the first
    for topic in RANKS:
        merge.exhausted(topic, 0)
    assert ids(merge.release(10)) == [("pr", 0, 0), ("pr", 0, 1), ("pr", 0, 2)]
    merge.add([rec("pr", 0, 3, 4)])
    merge.open("pr", 0, 10)  # a seek elsewhere
    assert merge.buffered() == 0
    merge.add([rec("pr", 0, 9, 5)])
    assert merge.buffered() == 0
    assert merge.next_offset("pr", 0) == 10
    merge.add([rec("pr", 0, 12, 6)])  # gaps (compaction, control records) are fine
    assert merge.next_offset("pr", 0) == 13
    assert math.isinf(-merge._lanes[("pr", 0)].frontier_ms)


def test_steps_keep_every_conflicting_pair_in_order_and_group_the_rest() -> None:
    # (name, kind, keys)
    items = [
        ("c1", "command", {"chat:a", "user:u"}),
        ("f1", "fact", {"chat:b"}),
        ("c2", "command", {"chat:c", "user:v"}),
        ("f2", "fact", {"chat:a", "user:u"}),  # after c1
        ("c3", "command", {"chat:d", "user:u"}),  # after f2 (same user)
        ("f3", "fact", {"chat:e"}),
    ]
    steps = plan_steps(items, kind=lambda i: i[1], keys=lambda i: i[2])
    layout = [(s.kind, [i[0] for i in s.items]) for s in steps]
    assert layout == [("command", ["c1", "c2"]), ("fact", ["f1", "f2", "f3"]), ("command", ["c3"])]
    position = {name: index for index, step in enumerate(layout) for name in step[1]}
    for a, (na, _, ka) in enumerate(items):
        for nb, _, kb in items[a + 1 :]:
            if ka & kb:
                assert position[na] <= position[nb]


@pytest.mark.parametrize("seed", range(20))
def test_steps_equal_one_by_one_application_on_random_batches(seed: int) -> None:
    """Apply each step's items in order to per-key logs: every key sees the merged order."""
    rng = random.Random(seed)
    items = [
        (n, rng.choice(["command", "fact"]), {f"k{rng.randrange(6)}" for _ in range(rng.randint(1, 2))})
        for n in range(60)
    ]
    steps = plan_steps(items, kind=lambda i: i[1], keys=lambda i: i[2])
    assert all(a.kind != b.kind for a, b in itertools.pairwise(steps))
    seen: dict[str, list[int]] = {}
    for step in steps:
        assert all(i[1] == step.kind for i in step.items)
        for n, _, keys in step.items:
            for k in keys:
                seen.setdefault(k, []).append(n)
    for k, order in seen.items():
        assert order == sorted(order), k
    assert sorted(n for step in steps for n, _, _ in step.items) == list(range(60))


def test_every_partition_number_of_every_topic_goes_to_one_member() -> None:
    topics = ["tr", "pr", "us"]
    parts = {t: range(8) for t in topics}
    for n in (1, 2, 3, 5, 9):
        members = {f"m{i}": topics for i in range(n)}
        layout = plan(members, parts)
        owners: dict[int, set[str]] = {}
        for member, by_topic in layout.items():
            assert set(by_topic) <= set(topics)
            numbers = {p for ps in by_topic.values() for p in ps}
            for p in numbers:
                assert all(p in by_topic[t] for t in topics)  # all three topics together
                owners.setdefault(p, set()).add(member)
        assert sorted(owners) == list(range(8))
        assert all(len(o) == 1 for o in owners.values())


def test_release_stops_before_a_record_that_would_pass_the_byte_limit() -> None:
    merge = OrderedMerge(RANKS)
    for topic in RANKS:
        merge.open(topic, 0, 0)
    big = [SourceRecord("tr", 0, i, b"k", b"x" * 1000, timestamp_from_ms(10 + i)) for i in range(5)]
    merge.add(big)
    for topic in ("pr", "us"):
        merge.exhausted(topic, 0)
    assert merge.buffered_of("tr", 0) == (5, 5 * 1001)
    assert ids(merge.release(10, max_bytes=2500)) == [("tr", 0, 0), ("tr", 0, 1)]
    assert ids(merge.release(10, max_bytes=10)) == [("tr", 0, 2)]  # at least one, whatever its size
    assert merge.buffered_of("tr", 0) == (2, 2 * 1001)
    assert ids(merge.release(10)) == [("tr", 0, 3), ("tr", 0, 4)]
    assert merge.buffered_of("tr", 0) == (0, 0)


@pytest.mark.parametrize("seed", range(40))
def test_split_disjoint_groups_share_no_key_and_keep_the_order(seed: int) -> None:
    rng = random.Random(seed)
    chats, users = rng.randint(1, 60), rng.randint(1, 25)
    items = [
        (n, f"chat{c}", f"user{rng.randrange(users)}" if rng.random() < 0.9 else f"user{c % users}")
        for n, c in enumerate(rng.randrange(chats) for _ in range(rng.randint(0, 300)))
    ]
    parts = rng.randint(1, 4)
    groups = split_disjoint(items, keys=lambda i: (i[1], i[2]), parts=parts)
    assert len(groups) <= parts and all(groups)
    assert sorted(i for g in groups for i in g) == items  # every item once
    for group in groups:
        assert group == sorted(group)  # the items' order within a group
    keys_of = [{k for i in g for k in (i[1], i[2])} for g in groups]
    for a, b in itertools.combinations(keys_of, 2):
        assert not a & b


def test_split_disjoint_balances_components_and_keeps_a_connected_chain_whole() -> None:
    # 8 users with 10 records each (one component each), and a chain joining users 8 and 9.
    items = [(n, f"u{n % 8}") for n in range(80)] + [(80, "u8", "u9"), (81, "u9", "u10")]
    groups = split_disjoint(items, keys=lambda i: i[1:], parts=2)
    assert sorted(len(g) for g in groups) == [40, 42]
    chain = next(g for g in groups if any(i[0] == 80 for i in g))
    assert any(i[0] == 81 for i in chain)
    assert split_disjoint(items[:5], keys=lambda i: ("same",), parts=2) == [items[:5]]
    assert split_disjoint([], keys=lambda i: (i,), parts=2) == []
