"""The engine's Kafka clients, configured for its guarantees (nothing commits an offset on its own)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from minichat.kafka_security import kafka_client_options
from minichat.partitioning import KeyedPartitioner
from minichat.processors.assignor import CoPartitionedAssignor
from minichat.settings import Settings


def produce_timeout_ms(s: Settings) -> int:
    """How long the producer keeps a batch of outputs before failing it."""
    return max(30_000, round(s.retry_give_up_s * 1000))


def rebalance_timeout_ms(s: Settings) -> int:
    """How long the group waits for a member to rejoin once a rebalance starts. Before rejoining,
    the member finishes the batch in hand (retried up to `retry_give_up_s`) and waits for every
    output's acknowledgement (up to the produce timeout); a group that stopped waiting sooner would
    hand its sets on while it still writes (a zombie). The session timeout on top covers the join."""
    return round(s.retry_give_up_s * 1000) + produce_timeout_ms(s) + round(s.session_timeout_s * 1000)


def input_consumer(s: Settings) -> AIOKafkaConsumer:
    """The group member that owns partition numbers of the three input topics (the assignor hands
    a member every topic's partition p of its numbers, and keeps them with it across rebalances);
    offsets are committed by the engine only."""
    return AIOKafkaConsumer(
        **kafka_client_options(s),
        group_id=s.group_id,
        client_id=f"{s.group_id}-engine",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        partition_assignment_strategy=(CoPartitionedAssignor(),),
        session_timeout_ms=round(s.session_timeout_s * 1000),
        rebalance_timeout_ms=rebalance_timeout_ms(s),
        heartbeat_interval_ms=round(s.heartbeat_interval_s * 1000),
        max_poll_interval_ms=max(300_000, round(s.retry_give_up_s * 2000)),
        fetch_max_bytes=s.fetch_max_bytes,
        max_partition_fetch_bytes=s.max_partition_fetch_bytes,
        fetch_max_wait_ms=s.fetch_max_wait_ms,
        key_deserializer=None,
        value_deserializer=None,
    )


def offsets_client(s: Settings) -> AIOKafkaConsumer:
    """A consumer that never fetches, for the end offsets of empty partitions: the broker
    answers one connection's requests in order, so on the fetching consumer's connection a
    ListOffsets waits behind the fetch in flight (up to `fetch_max_wait_ms`)."""
    return AIOKafkaConsumer(
        **kafka_client_options(s),
        group_id=None,
        client_id=f"{s.group_id}-engine-offsets",
        enable_auto_commit=False,
    )


def output_producer(s: Settings) -> AIOKafkaProducer:
    """Idempotent, and patient: while the broker is away aiokafka retries a batch with its
    sequence numbers (the broker drops a copy it already wrote) until `retry_give_up_s`,
    rather than failing it to a retry of ours, which could write a decision twice."""
    return AIOKafkaProducer(
        **kafka_client_options(s),
        client_id=f"{s.group_id}-engine",
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        partitioner=KeyedPartitioner(),
        request_timeout_ms=produce_timeout_ms(s),
    )
