"""Co-partitioned assignment: a worker owns partition numbers, not topic-partitions.

Partition *p* of `turn-requests`, `provider-responses` and `usage` hold the same chats (same key,
same partitioner, same count), and their records are applied as one ordered stream, so all three
must always be owned by one worker. aiokafka's range assignor happens to do that while every member
subscribes to the same topics; this assignor says it on purpose and keeps it through every
rebalance: it lays out partition numbers over the members, and every topic's partition *p* goes to
*p*'s member. Members are sorted by id, numbers spread round-robin, so the plan is deterministic.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

logger = logging.getLogger(__name__)


def plan(
    members: Mapping[str, Iterable[str]], partitions: Mapping[str, Iterable[int]]
) -> dict[str, dict[str, list[int]]]:
    """member → topic → partitions. Pure, for tests: `members` maps a member id to its topics,
    `partitions` a topic to its partition numbers."""
    numbers = sorted({p for topic_parts in partitions.values() for p in topic_parts})
    ids = sorted(members)
    result: dict[str, dict[str, list[int]]] = {m: defaultdict(list) for m in ids}
    if not ids:
        return {}
    for index, number in enumerate(numbers):
        owner = ids[index % len(ids)]
        for topic in sorted(members[owner]):
            if number in set(partitions.get(topic, ())):
                result[owner][topic].append(number)
    return {m: dict(topics) for m, topics in result.items()}


class CoPartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    name = "minichat-copartitioned"
    version = 0

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
        layout = plan({m: meta.subscription for m, meta in members.items()}, partitions)
        return {
            member: ConsumerProtocolMemberAssignment(cls.version, sorted(layout.get(member, {}).items()), b"")
            for member in members
        }

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, sorted(topics), b"")

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass
