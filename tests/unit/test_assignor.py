"""The sticky co-partitioned assignor: pure plans over random memberships, and its wire format."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from minichat.processors.assignor import (
    Claim,
    CoPartitionedAssignor,
    deal,
    decode_claim,
    encode_claim,
    plan,
)
from minichat.settings import Settings

TOPICS = ["tr", "pr", "us"]


def sets_of(layout: dict[str, dict[str, list[int]]]) -> dict[str, set[int]]:
    return {m: {p for ps in by_topic.values() for p in ps} for m, by_topic in layout.items()}


def check(layout: dict[str, dict[str, list[int]]], n: int) -> dict[str, set[int]]:
    """Co-partitioned (every topic's p with one member), complete, and balanced."""
    owned = sets_of(layout)
    owners: dict[int, list[str]] = {}
    for member, by_topic in layout.items():
        for p in owned[member]:
            assert all(p in by_topic[t] for t in TOPICS), (member, p)
            owners.setdefault(p, []).append(member)
    assert sorted(owners) == list(range(n))
    assert all(len(o) == 1 for o in owners.values())
    counts = [len(s) for s in owned.values()]
    assert max(counts) - min(counts) <= 1, counts
    return owned


def claims_from(owned: dict[str, set[int]], epoch: int) -> dict[str, Claim]:
    return {m: Claim(epoch, frozenset(s)) for m, s in owned.items()}


def moves(before: dict[str, set[int]], after: dict[str, set[int]]) -> int:
    """Sets whose owner changed (a set that had none counts too)."""
    owner_before = {p: m for m, s in before.items() for p in s}
    return sum(1 for m, s in after.items() for p in s if owner_before.get(p) != m)


@pytest.mark.parametrize("seed", range(60))
def test_random_membership_changes_keep_sets_where_they_are(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 24)
    parts = {t: range(n) for t in TOPICS}
    members = [f"m{rng.randrange(10**6):06d}" for _ in range(rng.randint(1, 5))]
    owned = check(plan({m: TOPICS for m in members}, parts), n)
    epoch = 1
    for step in range(12):
        claims = claims_from(owned, epoch)
        if len(members) > 1 and rng.random() < 0.5:
            gone = rng.choice(members)
            members = [m for m in members if m != gone]
            after = check(plan({m: TOPICS for m in members}, parts, claims), n)
            # a member leaving moves only its own sets
            for m in members:
                assert owned[m] <= after[m], (step, m)
            assert moves(owned, after) == len(owned[gone])
        else:
            new = f"m{rng.randrange(10**6):06d}"
            members = [*members, new]
            after = check(plan({m: TOPICS for m in members}, parts, claims), n)
            # a member joining takes at most its share, and only the new member gains sets
            assert moves(owned, after) <= math.ceil(n / len(set(members)))
            for m in members:
                if m != new:
                    assert after[m] <= owned[m], (step, m)
        owned = {m: after[m] for m in members}
        epoch += 1


def test_the_same_membership_keeps_every_set() -> None:
    parts = {t: range(16) for t in TOPICS}
    members = {m: TOPICS for m in ("b", "a", "c")}
    first = sets_of(plan(members, parts))
    # even with different ids sorting differently, a rejoin with the same claims changes nothing
    claims = claims_from(first, 4)
    assert sets_of(plan(members, parts, claims)) == first


def test_a_set_claimed_twice_goes_to_the_later_epoch() -> None:
    """A zombie that lost its sets rejoins still claiming them: the member given them later keeps them."""
    claims = {"zombie": Claim(3, frozenset({0, 1})), "heir": Claim(5, frozenset({0, 1}))}
    dealt = deal(range(4), ["zombie", "heir"], claims)
    assert dealt == {"heir": [0, 1], "zombie": [2, 3]}


def test_claims_outside_the_partitions_and_of_left_members_are_ignored() -> None:
    claims = {"a": Claim(2, frozenset({7, 99})), "gone": Claim(2, frozenset({0, 1, 2}))}
    dealt = deal(range(8), ["a", "b"], claims)
    assert 7 in dealt["a"]
    assert sorted(dealt["a"] + dealt["b"]) == list(range(8))
    assert {len(v) for v in dealt.values()} == {4}


def test_more_members_than_sets_leaves_some_idle() -> None:
    dealt = deal(range(2), ["a", "b", "c"], {"c": Claim(1, frozenset({0, 1}))})
    assert dealt["c"] in ([0], [1])
    assert sorted(dealt["a"] + dealt["b"] + dealt["c"]) == [0, 1]
    assert deal(range(3), [], {}) == {}


def test_claims_survive_the_wire_and_garbage_claims_nothing() -> None:
    claim = Claim(12, frozenset({3, 1, 2}))
    assert decode_claim(encode_claim(claim)) == claim
    for junk in (
        b"",
        None,
        b"\x00\x01",
        b"[]",
        b'{"epoch": "x"}',
        b'{"sets": [1]}',
        b'{"epoch": 1, "sets": ["a"]}',
    ):
        assert decode_claim(junk) == Claim(), junk


def test_the_assignor_reports_what_it_was_given_in_its_next_join() -> None:
    cluster = ClusterMetadata()
    cluster.partitions_for_topic = lambda topic: set(range(6))  # type: ignore[method-assign]
    a, b = CoPartitionedAssignor(), CoPartitionedAssignor()
    joined = {"a": a.metadata(TOPICS), "b": b.metadata(TOPICS)}
    first = CoPartitionedAssignor.assign(cluster, joined)
    a.on_assignment(first["a"])
    b.on_assignment(first["b"])
    assert a.claim.epoch == b.claim.epoch == 1
    assert sorted(a.claim.sets | b.claim.sets) == list(range(6))
    assert {tp.topic for tp in first["a"].partitions()} == set(TOPICS)

    c = CoPartitionedAssignor()
    again = CoPartitionedAssignor.assign(
        cluster, {"b": b.metadata(TOPICS), "a": a.metadata(TOPICS), "c": c.metadata(TOPICS)}
    )
    for member, assignor in (("a", a), ("b", b)):
        given = {tp.partition for tp in again[member].partitions()}
        assert given <= assignor.claim.sets and len(given) == 2
    assert decode_claim(again["c"].user_data).epoch == 2


def test_metadata_is_what_aiokafka_sends() -> None:
    meta = CoPartitionedAssignor().metadata(["us", "tr"])
    assert isinstance(meta, ConsumerProtocolMemberMetadata)
    assert meta.subscription == ["tr", "us"]
    assert isinstance(meta.encode(), bytes)


def test_the_rebalance_timeout_covers_the_batch_in_hand_and_its_acknowledgements() -> None:
    """on_revoked waits for a batch retried up to `retry_give_up_s`, then for every output's
    acknowledgement (the produce timeout): the group must wait that long for the member."""
    from minichat.processors.clients import input_consumer, produce_timeout_ms, rebalance_timeout_ms

    async def built(s: Settings) -> tuple[int, tuple[object, ...]]:
        consumer = input_consumer(s)  # built, never started
        return consumer._rebalance_timeout_ms, consumer._partition_assignment_strategy

    for give_up in (1.0, 120.0, 600.0):
        s = Settings(retry_give_up_s=give_up, session_timeout_s=10.0)
        assert rebalance_timeout_ms(s) >= give_up * 1000 + produce_timeout_ms(s)
        timeout, strategy = asyncio.run(built(s))
        assert timeout == rebalance_timeout_ms(s)
        # an instance per consumer: it carries its member's claim into the next join
        assert len(strategy) == 1 and isinstance(strategy[0], CoPartitionedAssignor)
