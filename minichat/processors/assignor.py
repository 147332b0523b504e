"""Sticky co-partitioned assignment: a worker owns partition sets, and keeps them.

Partition *p* of `turn-requests`, `provider-responses` and `usage` hold the same chats (same key,
same partitioner, same count), and their records are applied as one ordered stream, so all three
must always be owned by one worker: every topic's partition *p* goes to set *p*'s member.

Sticky, because every move of a set is a hand-over between two workers (the old owner must finish
its batch and acknowledgements, the new one reloads the stored positions), and a hand-over that
races a slow old owner is where a rebalance can go wrong. So each member reports in its join
metadata (`user_data`) the sets it was last given and the epoch of that assignment; the leader
keeps every set with its reporting owner while that owner is still a member (a set claimed twice
goes to the later epoch: the other claim is a zombie's), and moves only what balance requires
(counts differ by at most one, the members holding most keep the larger shares) and the sets of
members that left. The plan is a pure function of (members, partitions, claims).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """What a member owned after the assignment of `epoch` (0: nothing yet)."""

    epoch: int = 0
    sets: frozenset[int] = frozenset()


NO_CLAIM = Claim()


def encode_claim(claim: Claim) -> bytes:
    return json.dumps({"epoch": claim.epoch, "sets": sorted(claim.sets)}, separators=(",", ":")).encode()


def decode_claim(data: bytes | None) -> Claim:
    """A member that sends nothing usable (an older worker, a foreign client) claims nothing."""
    if not data:
        return NO_CLAIM
    try:
        raw = json.loads(data)
        epoch = raw["epoch"]
        sets = raw.get("sets", [])
        if not isinstance(epoch, int) or not all(isinstance(p, int) for p in sets):
            return NO_CLAIM
        return Claim(epoch, frozenset(sets))
    except (ValueError, TypeError, KeyError, AttributeError):
        return NO_CLAIM


def deal(numbers: Iterable[int], members: Iterable[str], claims: Mapping[str, Claim]) -> dict[str, list[int]]:
    """member → partition set numbers, balanced (counts differ by at most one) and sticky: a set
    stays with the member claiming it unless that member holds more than its share."""
    numbers = sorted(set(numbers))
    ids = sorted(set(members))
    if not ids:
        return {}
    valid = set(numbers)
    best: dict[int, tuple[int, str]] = {}
    for member in ids:
        claim = claims.get(member, NO_CLAIM)
        for p in claim.sets & valid:
            current = best.get(p)
            # the later epoch wins; on a tie (never from one leader) the smaller member id
            if (
                current is None
                or claim.epoch > current[0]
                or (claim.epoch == current[0] and member < current[1])
            ):
                best[p] = (claim.epoch, member)
    held: dict[str, list[int]] = {m: [] for m in ids}
    for p in numbers:
        if p in best:
            held[best[p][1]].append(p)
    base, extra = divmod(len(numbers), len(ids))
    by_holding = sorted(ids, key=lambda m: (-len(held[m]), m))
    quota = {m: base + (1 if rank < extra else 0) for rank, m in enumerate(by_holding)}
    kept = {m: held[m][: quota[m]] for m in ids}
    taken = {p for ps in kept.values() for p in ps}
    pool = [p for p in numbers if p not in taken]
    for m in ids:
        need = quota[m] - len(kept[m])
        kept[m] = sorted(kept[m] + pool[:need])
        del pool[:need]
    return kept


def plan(
    members: Mapping[str, Iterable[str]],
    partitions: Mapping[str, Iterable[int]],
    claims: Mapping[str, Claim] | None = None,
) -> dict[str, dict[str, list[int]]]:
    """member → topic → partitions. Pure, for tests: `members` maps a member id to its topics,
    `partitions` a topic to its partition numbers, `claims` a member id to what it owns now."""
    parts = {t: set(ps) for t, ps in partitions.items()}
    numbers = {p for ps in parts.values() for p in ps}
    dealt = deal(numbers, members, claims or {})
    result: dict[str, dict[str, list[int]]] = {}
    for member, sets in dealt.items():
        by_topic: dict[str, list[int]] = defaultdict(list)
        for topic in sorted(members[member]):
            by_topic[topic] = [p for p in sets if p in parts.get(topic, ())]
        result[member] = {t: ps for t, ps in by_topic.items() if ps}
    return result


class CoPartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """One instance per consumer: it remembers what its member was last given (`on_assignment`)
    and reports it in the next join (`metadata`)."""

    name = "minichat-copartitioned"
    version = 0

    def __init__(self) -> None:
        self.claim = NO_CLAIM

    @classmethod
    def assign(
        cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = {t for meta in members.values() for t in meta.subscription}
        partitions: dict[str, set[int]] = {}
        for topic in topics:
            found = cluster.partitions_for_topic(topic)
            if found is None:
                logger.warning("no partition metadata for topic %s", topic)
                continue
            partitions[topic] = set(found)
        counts = {len(p) for p in partitions.values()}
        if len(counts) > 1:
            # `minichat topics create` refuses to leave them so, and a worker refuses to start.
            logger.error(
                "input topics are not co-partitioned: %s", {t: len(p) for t, p in partitions.items()}
            )
        claims = {m: decode_claim(meta.user_data) for m, meta in members.items()}
        epoch = max((c.epoch for c in claims.values()), default=0) + 1
        layout = plan({m: meta.subscription for m, meta in members.items()}, partitions, claims)
        sets = {m: sorted({p for ps in layout.get(m, {}).values() for p in ps}) for m in members}
        moved = sum(1 for m, ps in sets.items() for p in ps if p not in claims[m].sets)
        logger.info(
            "partition sets dealt (assignment epoch %d, %d member(s)): %d moved, %s",
            epoch,
            len(members),
            moved,
            sorted(sets.values()),
        )
        return {
            member: ConsumerProtocolMemberAssignment(
                cls.version,
                sorted(layout.get(member, {}).items()),
                encode_claim(Claim(epoch, frozenset(sets[member]))),
            )
            for member in members
        }

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), encode_claim(self.claim))

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        epoch = decode_claim(assignment.user_data).epoch
        self.claim = Claim(epoch, frozenset(tp.partition for tp in assignment.partitions()))
