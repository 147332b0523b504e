"""The decode path against the reference: `TypeAdapter.validate_json` and the key check by the
chat id's text, as the decoder did before it called the prebuilt validator and cached keys. Every
hostile corpus entry (and valid events) must give the same model values or the same dead-letter
code and text."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from minichat.models.events import DecodeError, codec
from minichat.models.events.codec import _classify, _describe_key, decode
from minichat.models.events.inputs import PROVIDER_ADAPTER, TURN_REQUEST_ADAPTER, USAGE_ADAPTER
from minichat.models.events.vocabulary import MAX_PAYLOAD_BYTES, TopicKind
from tests.data.hostile_records import CORPUS, FIELD_WIDTHS, Scene, completed, requested, usage

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "turn-requests": TURN_REQUEST_ADAPTER,
    "provider-responses": PROVIDER_ADAPTER,
    "usage": USAGE_ADAPTER,
}


def reference(topic: TopicKind, key: bytes | None, value: bytes | None) -> Any:
    if value is None:
        raise DecodeError("malformed_json", "record has no value (tombstone)")
    if len(value) > MAX_PAYLOAD_BYTES:
        limit = MAX_PAYLOAD_BYTES
        raise DecodeError("payload_too_large", f"value is {len(value)} bytes; the limit is {limit}")
    try:
        event = _ADAPTERS[topic].validate_json(value)
    except ValidationError as exc:
        raise _classify(exc, topic, value) from None
    if key != str(event.chat_id).encode("ascii"):
        raise DecodeError("key_mismatch", f"record key {_describe_key(key)} is not chat_id {event.chat_id}")
    return event


def outcome(decoder: Any, topic: TopicKind, key: bytes | None, value: bytes | None) -> Any:
    try:
        event = decoder(topic, key, value)
    except DecodeError as error:
        return ("dead letter", error.code, error.detail)
    return (type(event), event.model_dump(), event.model_fields_set)


SCENE = Scene(*(uuid.uuid4() for _ in range(13)))
VALID = [
    ("turn-requests", requested(SCENE)),
    ("turn-requests", requested(SCENE, after={"provider-responses": 3, "usage": None}, web_search=None)),
    ("provider-responses", completed(SCENE)),
    ("provider-responses", completed(SCENE, usage=None, finish_reason=None)),
    ("usage", usage(SCENE, model="gpt-5-mini", reasoning_tokens=None)),
]


@pytest.mark.parametrize("entry", CORPUS + FIELD_WIDTHS, ids=lambda h: h.name)
def test_every_hostile_record_gives_the_reference_outcome(entry: Any) -> None:
    record = entry.build(SCENE)
    assert outcome(decode, entry.topic, record.key, record.value) == outcome(
        reference, entry.topic, record.key, record.value
    )


@pytest.mark.parametrize(("topic", "event"), VALID)
def test_valid_events_give_the_reference_values(topic: TopicKind, event: dict[str, Any]) -> None:
    key, value = str(SCENE.chat).encode(), json.dumps(event).encode()
    got = outcome(decode, topic, key, value)
    assert got == outcome(reference, topic, key, value)
    assert got[0] != "dead letter"


def test_the_key_cache_is_bounded_and_still_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_MAX_KEYS", 2)
    for _ in range(5):
        chat = uuid.uuid4()
        event = {**requested(SCENE), "chat_id": str(chat)}
        value = json.dumps(event).encode()
        assert decode("turn-requests", str(chat).encode(), value).chat_id == chat
        with pytest.raises(DecodeError) as caught:
            decode("turn-requests", str(chat).upper().encode(), value)
        assert caught.value.code == "key_mismatch"
    assert len(codec._KEYS) <= 2
