"""Every derived id, in one place: uuid5 of the contract's keys, so a replay or a rebuild derives
the same ids the live worker did (never a random one for anything stored or sent)."""

from __future__ import annotations

from functools import lru_cache
from hashlib import sha1
from uuid import UUID, SafeUUID

from minichat.domain.quota import BucketKey

ID_NAMESPACE = UUID("9adf340e-8e36-5009-a11f-afe188bf1e3a")

_NAMESPACE_SHA1 = sha1(ID_NAMESPACE.bytes, usedforsecurity=False)
_VERSION_5 = (0x5000 << 64) | (0x8000 << 48)  # RFC 4122 version 5, variant 10
_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_new = object.__new__
_set = object.__setattr__


def derived_id(name: str) -> UUID:
    """`uuid.uuid5(ID_NAMESPACE, name)`, equal to it bit for bit (a unit test holds them together):
    the namespace's hash state is reused and the UUID is built from its integer without
    `UUID.__init__`'s argument checks (uuid5 was 3-4 % of a worker's CPU)."""
    digest = _NAMESPACE_SHA1.copy()
    digest.update(name.encode())
    value = _new(UUID)
    _set(value, "int", (int.from_bytes(digest.digest()[:16]) & _KEEP) | _VERSION_5)
    _set(value, "is_safe", SafeUUID.unknown)
    return value


@lru_cache(maxsize=65536)
def turn_id_for(chat_id: UUID, request_id: UUID) -> UUID:
    """Cached: a turn's decision and its row both derive it."""
    return derived_id(f"turn:{chat_id}:{request_id}")


def message_id_for(chat_id: UUID, request_id: UUID, role: str) -> UUID:
    return derived_id(f"message:{chat_id}:{request_id}:{role}")


def quota_row_id(tenant_id: UUID, user_id: UUID, key: BucketKey) -> UUID:
    return derived_id(f"quota:{tenant_id}:{user_id}:{key.period_type}:{key.period_start}:{key.bucket}")


def orphaned_event_id(turn_id: UUID, progress_seq: int) -> UUID:
    """Same turn, same progress: same id, so a re-sent signal is recognisably the same one."""
    return derived_id(f"turn.orphaned:{turn_id}:{progress_seq}")


def grace_expired_event_id(turn_id: UUID) -> UUID:
    return derived_id(f"usage.grace_expired:{turn_id}")


def alert_event_id(tenant_id: UUID, user_id: UUID, key: BucketKey, threshold_percent: int) -> UUID:
    """One id per threshold and window: a re-sent or rebuilt alert is recognisably the same one."""
    return derived_id(
        f"alert:{tenant_id}:{user_id}:{key.bucket}:{key.period_type}:{key.period_start}:{threshold_percent}"
    )
