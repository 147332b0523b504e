"""The cached partitioner puts every key where Kafka's default partitioner (the Java client's
murmur2) does: gateways and minichat must agree on a chat's partition."""

from __future__ import annotations

import random
import uuid

from aiokafka.partitioner import DefaultPartitioner

from minichat.partitioning import KeyedPartitioner


def test_same_partition_as_the_default_partitioner() -> None:
    rng = random.Random(7)
    keyed, default = KeyedPartitioner(max_keys=50), DefaultPartitioner()
    keys = [str(uuid.UUID(int=rng.getrandbits(128))).encode() for _ in range(300)]
    keys += [b"", b"a", b"ab", b"abc", b"abcd", b"\xff\x00\x80"]  # every tail length of murmur2
    for count in (1, 3, 8, 24):
        partitions = list(range(count))
        for key in keys * 2:  # the second pass reads the cache (and crosses its emptying)
            assert keyed(key, partitions, partitions) == default(key, partitions, partitions)


def test_known_partitions_of_the_java_client() -> None:
    # Kafka's Utils.murmur2 test vectors, via `toPositive(murmur2(key)) % n`.
    keyed = KeyedPartitioner()
    assert keyed(b"21", list(range(1000)), []) == (-973932308 & 0x7FFFFFFF) % 1000
    assert keyed(b"foobar", list(range(8)), []) == (-790332482 & 0x7FFFFFFF) % 8


def test_cache_stays_bounded() -> None:
    keyed = KeyedPartitioner(max_keys=10)
    for i in range(100):
        keyed(str(i).encode(), [0, 1, 2], [0, 1, 2])
    assert len(keyed._hashes) <= 10


def test_a_record_without_key_goes_to_an_available_partition() -> None:
    keyed = KeyedPartitioner()
    assert {keyed(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert {keyed(None, [0, 1], []) for _ in range(50)} <= {0, 1}
