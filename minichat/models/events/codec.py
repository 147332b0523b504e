"""The wire codec: every input record decoded once, strictly, or refused with the dead letter's
reason (`DecodeError`); any event encoded as compact JSON."""

from __future__ import annotations

import re
from typing import Final, TypeVar
from uuid import UUID

from pydantic import (
    BaseModel,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails

from minichat.models.events.inputs import (
    PROVIDER_ADAPTER,
    TURN_REQUEST_ADAPTER,
    USAGE_ADAPTER,
    Envelope,
    InputEvent,
    ProviderEvent,
    TurnRequestEvent,
    UsageEvent,
)
from minichat.models.events.vocabulary import MAX_PAYLOAD_BYTES, DeadLetterCode, TopicKind


def to_json_bytes(event: BaseModel) -> bytes:
    """Compact JSON: UUIDs as strings, datetimes RFC 3339 (`Z` for UTC), None as null."""
    return event.model_dump_json().encode("utf-8")


class DecodeError(ValueError):
    """A record that must be dead-lettered; `detail` names fields and problems, never content."""

    def __init__(self, code: DeadLetterCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: DeadLetterCode = code
        self.detail = detail


_MAX_LISTED_ERRORS: Final = 5
_PRINTABLE_TAG = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")
# Error types whose pydantic message quotes part of the input.
_QUIET_MESSAGES: Final = {
    "uuid_parsing": "Input should be a valid UUID",
    "uuid_type": "Input should be a valid UUID",
}


_E = TypeVar("_E", bound=Envelope)


def decode_turn_request(key: bytes | None, value: bytes | None) -> TurnRequestEvent:
    """Decode a turn-requests record or raise `DecodeError`."""
    return _decode(TURN_REQUEST_ADAPTER, "turn-requests", key, value)


def decode_provider_event(key: bytes | None, value: bytes | None) -> ProviderEvent:
    """Decode a provider-responses record or raise `DecodeError`."""
    return _decode(PROVIDER_ADAPTER, "provider-responses", key, value)


def decode_usage_event(key: bytes | None, value: bytes | None) -> UsageEvent:
    """Decode a usage record or raise `DecodeError`."""
    return _decode(USAGE_ADAPTER, "usage", key, value)


def decode(topic: TopicKind, key: bytes | None, value: bytes | None) -> InputEvent:
    """Decode a record of any input topic (`topic` without the prefix) or raise `DecodeError`."""
    if topic == "turn-requests":
        return decode_turn_request(key, value)
    if topic == "provider-responses":
        return decode_provider_event(key, value)
    return decode_usage_event(key, value)


def _decode(adapter: TypeAdapter[_E], topic: TopicKind, key: bytes | None, value: bytes | None) -> _E:
    # Order matters: size before parsing (never parse an oversize record), parsing before the key
    # check (the key is compared with the decoded chat_id).
    if value is None:
        raise DecodeError("malformed_json", "record has no value (tombstone)")
    if len(value) > MAX_PAYLOAD_BYTES:
        raise DecodeError(
            "payload_too_large", f"value is {len(value)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    try:
        # The adapter's own prebuilt validator, called on the bytes without the wrapper's per-call
        # set-up: the same validation (msgspec structs were measured slower once they had to build
        # these pydantic models).
        event: _E = adapter.validator.validate_json(value)
    except ValidationError as exc:
        raise _classify(exc, topic, value) from None
    if key != _canonical_key(event.chat_id):
        raise DecodeError("key_mismatch", f"record key {_describe_key(key)} is not chat_id {event.chat_id}")
    return event


_KEYS: dict[int, bytes] = {}
_MAX_KEYS: Final = 200_000


def _canonical_key(chat_id: UUID) -> bytes:
    """The key a chat's records carry (its id's canonical text); kept per chat, whose records keep
    coming (the cache is emptied when full: memory is not to grow without bound)."""
    number = chat_id.int
    key = _KEYS.get(number)
    if key is None:
        if len(_KEYS) >= _MAX_KEYS:
            _KEYS.clear()
        key = _KEYS[number] = str(chat_id).encode("ascii")
    return key


def _classify(exc: ValidationError, topic: TopicKind, value: bytes) -> DecodeError:
    errors = exc.errors(include_url=False, include_context=False, include_input=True)
    first = errors[0]
    if first["loc"] == ():
        kind = first["type"]
        if kind == "json_invalid":
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DecodeError("malformed_json", f"value is not valid UTF-8 (byte {bad.start})")
            return DecodeError("malformed_json", _safe_message(first))
        if kind == "union_tag_not_found":
            return DecodeError("schema_violation", "type: Field required [missing]")
        if kind == "union_tag_invalid":
            raw = first["input"]
            tag = raw.get("type") if isinstance(raw, dict) else None
            if not isinstance(tag, str):
                return DecodeError("schema_violation", "type: Input should be a valid string [string_type]")
            name = repr(tag) if _PRINTABLE_TAG.fullmatch(tag) else f"of {len(tag)} characters"
            return DecodeError("unknown_type", f"type {name} is not an event of {topic}")
        # The value is JSON but not an object (array, string, number, null).
        return DecodeError("malformed_json", "value is not a JSON object")
    tag = str(first["loc"][0])
    shown = [f"{_path(e['loc'][1:])}: {_safe_message(e)} [{e['type']}]" for e in errors[:_MAX_LISTED_ERRORS]]
    more = len(errors) - _MAX_LISTED_ERRORS
    if more > 0:
        shown.append(f"and {more} more")
    return DecodeError("schema_violation", f"{tag}: " + "; ".join(shown))


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(event)"


def _safe_message(error: ErrorDetails) -> str:
    # Built from the error type and pydantic's message; the message is dropped when it quotes
    # the input, so content can never leak into a dead letter's detail.
    quiet = _QUIET_MESSAGES.get(error["type"])
    if quiet is not None:
        return quiet
    message = error["msg"]
    bad = error.get("input")
    if isinstance(bad, str) and len(bad) >= 3 and bad in message:
        return error["type"]
    return message


def _describe_key(key: bytes | None) -> str:
    if key is None:
        return "null"
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return f"of {len(key)} non-ASCII bytes"
    return repr(text) if len(text) <= 64 and text.isprintable() else f"of {len(key)} bytes"
