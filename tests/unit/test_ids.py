"""The derived ids: `derived_id` must equal the standard library's bit for bit (every stored
and published id depends on it; a rebuild compares them with the live database's)."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from minichat.domain import ids
from minichat.domain.quota import BucketKey

NAMES = [
    "",
    "turn:a:b",
    "ü ☃ 𝄞",
    "x" * 1000,
    *(f"message:{uuid.uuid4()}:{uuid.uuid4()}:user" for _ in range(200)),
]


@pytest.mark.parametrize("name", NAMES)
def test_uuid5_equals_the_standard_library(name: str) -> None:
    mine = ids.derived_id(name)
    theirs = uuid.uuid5(ids.ID_NAMESPACE, name)
    assert mine == theirs and mine.int == theirs.int and str(mine) == str(theirs)
    assert (mine.version, mine.variant, mine.is_safe) == (5, uuid.RFC_4122, uuid.SafeUUID.unknown)
    assert hash(mine) == hash(theirs) and mine.bytes == theirs.bytes


def test_derived_ids_are_uuid5_of_their_keys() -> None:
    chat, request, tenant, user = (uuid.uuid4() for _ in range(4))
    key = BucketKey("daily", date(2026, 11, 29), "total")
    ns = ids.ID_NAMESPACE
    assert ids.turn_id_for(chat, request) == uuid.uuid5(ns, f"turn:{chat}:{request}")
    assert ids.message_id_for(chat, request, "assistant") == uuid.uuid5(
        ns, f"message:{chat}:{request}:assistant"
    )
    assert ids.quota_row_id(tenant, user, key) == uuid.uuid5(
        ns, f"quota:{tenant}:{user}:daily:2026-11-29:total"
    )
