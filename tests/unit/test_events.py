"""The wire models and the input decoder: contract examples in, the right dead-letter code out."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel, ValidationError

from minichat.models.events import (
    DEAD_LETTER_CODES,
    DEAD_LETTER_PAYLOAD_BYTES,
    DECISION_ERROR_CODES,
    INPUT_MODELS,
    MAX_PAYLOAD_BYTES,
    OUTPUT_ADAPTER,
    ChatDelete,
    DeadLetter,
    DecodeError,
    TopicKind,
    TurnCancelled,
    TurnCompleted,
    TurnDecision,
    TurnDelete,
    TurnEdit,
    TurnFailed,
    TurnOrphaned,
    TurnProgress,
    TurnRequested,
    TurnRetry,
    Usage,
    UsageAdjusted,
    UsageGraceExpired,
    UsageReported,
    UsageSettled,
    decode,
    decode_provider_event,
    decode_turn_request,
    decode_usage_event,
    dedupe_key,
    to_json_bytes,
)

TENANT = UUID("7d0a4a38-6a4c-4f57-9d3b-1c52b0a0e001")
CHAT = UUID("0b6f7c1e-2d3a-4e5f-8a9b-0c1d2e3f4a5b")
USER = UUID("5e1a9c2b-8f3d-4a6e-b7c0-d1e2f3a4b5c6")
REQUEST = UUID("c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f")
NEW_REQUEST = UUID("d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70")
TURN = UUID("e5f6a7b8-c9d0-5e1f-8a2b-3c4d5e6f7a81")
EVENT = UUID("f6a7b8c9-d0e1-4f2a-9b3c-4d5e6f7a8b92")
KEY = str(CHAT).encode()
SECRET = "Zq9-SECRET-CONTENT-Zq9"
AT = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)

Decoder = Callable[[bytes | None, bytes | None], BaseModel]


def envelope(type_: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": type_,
        "event_id": str(EVENT),
        "schema_version": 1,
        "occurred_at": "2025-03-14T15:09:26.535Z",
        "tenant_id": str(TENANT),
        "chat_id": str(CHAT),
        **fields,
    }


def raw(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# One realistic example per input type, as a gateway (or the watchdog) would write it.
EXAMPLES: dict[str, tuple[Decoder, dict[str, Any]]] = {
    "turn.requested": (
        decode_turn_request,
        envelope(
            "turn.requested",
            user_id=str(USER),
            request_id=str(REQUEST),
            content="Summarise the attached report in three bullet points.",
            model="gpt-4.1-mini",
            title="Quarterly report",
            web_search=True,
            code_interpreter=False,
            image_count=2,
            requester_type="user",
        ),
    ),
    "turn.retry": (
        decode_turn_request,
        envelope("turn.retry", user_id=str(USER), request_id=str(REQUEST), new_request_id=str(NEW_REQUEST)),
    ),
    "turn.edit": (
        decode_turn_request,
        envelope(
            "turn.edit",
            user_id=str(USER),
            request_id=str(REQUEST),
            new_request_id=str(NEW_REQUEST),
            content="Make it five bullet points.",
        ),
    ),
    "turn.delete": (decode_turn_request, envelope("turn.delete", user_id=str(USER), request_id=str(REQUEST))),
    "chat.delete": (decode_turn_request, envelope("chat.delete", user_id=str(USER))),
    "turn.progress": (decode_provider_event, envelope("turn.progress", request_id=str(REQUEST))),
    "turn.completed": (
        decode_provider_event,
        envelope(
            "turn.completed",
            request_id=str(REQUEST),
            content="- Revenue grew 12 %\n- Costs fell\n- Outlook: stable",
            provider_response_id="resp_01HX",
            finish_reason="length",
            usage={
                "input_tokens": 1200,
                "output_tokens": 350,
                "cache_read_input_tokens": 1000,
                "reasoning_tokens": 64,
                "web_search_calls": 1,
                "model": "gpt-4.1-mini-2025-04-14",
            },
        ),
    ),
    "turn.failed": (
        decode_provider_event,
        envelope(
            "turn.failed",
            request_id=str(REQUEST),
            error_code="provider_timeout",
            error_detail="upstream timed out after 60 s",
            usage={"input_tokens": 1200, "output_tokens": 0},
        ),
    ),
    "turn.cancelled": (
        decode_provider_event,
        envelope("turn.cancelled", request_id=str(REQUEST), content="- Revenue gr"),
    ),
    "turn.orphaned": (
        decode_provider_event,
        envelope("turn.orphaned", request_id=str(REQUEST), progress_seq=17),
    ),
    "usage.reported": (
        decode_usage_event,
        envelope(
            "usage.reported",
            request_id=str(REQUEST),
            input_tokens=1200,
            output_tokens=350,
            cache_write_input_tokens=200,
            code_interpreter_calls=2,
            model="gpt-4.1-mini",
        ),
    ),
    "usage.grace_expired": (decode_usage_event, envelope("usage.grace_expired", request_id=str(REQUEST))),
}


def minimal_requested(**fields: Any) -> dict[str, Any]:
    return envelope("turn.requested", user_id=str(USER), request_id=str(REQUEST), content="hi") | fields


def minimal_completed(**fields: Any) -> dict[str, Any]:
    return envelope("turn.completed", request_id=str(REQUEST), content="hello") | fields


def minimal_reported(**fields: Any) -> dict[str, Any]:
    return envelope("usage.reported", request_id=str(REQUEST), input_tokens=10, output_tokens=5) | fields


def decode_error(decoder: Decoder, value: bytes | None, key: bytes | None = KEY) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decoder(key, value)
    return caught.value


# --------------------------------------------------------------------------------------------
# Accepting the contract's events
# --------------------------------------------------------------------------------------------


def test_every_input_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(INPUT_MODELS)


@pytest.mark.parametrize("type_", sorted(EXAMPLES))
def test_each_input_example_decodes_to_its_model(type_: str) -> None:
    decoder, example = EXAMPLES[type_]
    event = decoder(KEY, raw(example))
    assert type(event) is INPUT_MODELS[type_]
    assert event.model_dump(mode="json", include={"type", "tenant_id", "chat_id", "event_id"}) == {
        "type": type_,
        "tenant_id": str(TENANT),
        "chat_id": str(CHAT),
        "event_id": str(EVENT),
    }


@pytest.mark.parametrize("type_", sorted(EXAMPLES))
def test_generic_decode_routes_by_topic(type_: str) -> None:
    decoder, example = EXAMPLES[type_]
    topics: list[tuple[TopicKind, Decoder]] = [
        ("turn-requests", decode_turn_request),
        ("provider-responses", decode_provider_event),
        ("usage", decode_usage_event),
    ]
    topic = next(topic for topic, candidate in topics if candidate is decoder)
    assert decode(topic, KEY, raw(example)) == decoder(KEY, raw(example))


def test_turn_requested_fields_and_defaults() -> None:
    full = decode_turn_request(KEY, raw(EXAMPLES["turn.requested"][1]))
    assert isinstance(full, TurnRequested)
    assert full.request_id == REQUEST
    assert full.model == "gpt-4.1-mini"
    assert (full.web_search, full.code_interpreter, full.image_count) == (True, False, 2)
    assert full.occurred_at == datetime(2025, 3, 14, 15, 9, 26, 535000, tzinfo=UTC)

    minimal = decode_turn_request(KEY, raw(minimal_requested()))
    assert isinstance(minimal, TurnRequested)
    assert minimal.model is None  # required only for a new chat: a business rule, not schema
    assert minimal.title is None
    assert (minimal.web_search, minimal.code_interpreter, minimal.image_count) == (False, False, 0)
    assert minimal.requester_type == "user"


def test_provider_and_usage_defaults() -> None:
    completed = decode_provider_event(KEY, raw(minimal_completed()))
    assert isinstance(completed, TurnCompleted)
    assert (completed.finish_reason, completed.usage, completed.provider_response_id) == ("stop", None, None)

    inline = decode_provider_event(KEY, raw(EXAMPLES["turn.completed"][1]))
    assert isinstance(inline, TurnCompleted)
    assert inline.usage == Usage(
        input_tokens=1200,
        output_tokens=350,
        cache_read_input_tokens=1000,
        reasoning_tokens=64,
        web_search_calls=1,
        model="gpt-4.1-mini-2025-04-14",
    )
    assert inline.usage.cache_write_input_tokens == 0
    assert inline.usage.known

    reported = decode_usage_event(KEY, raw(minimal_reported()))
    assert isinstance(reported, UsageReported)
    assert reported.to_usage() == Usage(input_tokens=10, output_tokens=5)
    assert not Usage(input_tokens=0, output_tokens=0).known


def test_cancelled_content_may_be_empty() -> None:
    event = decode_provider_event(KEY, raw(envelope("turn.cancelled", request_id=str(REQUEST), content="")))
    assert isinstance(event, TurnCancelled)
    assert event.content == ""


def test_uuid_and_datetime_parse_from_json_strings_in_strict_mode() -> None:
    # Strict mode accepts the JSON spelling of UUIDs and datetimes, but not Python-side strings.
    event = decode_turn_request(KEY, raw(minimal_requested()))
    assert isinstance(event.event_id, UUID)
    assert isinstance(event.occurred_at, datetime)
    with pytest.raises(ValidationError):
        TurnProgress.model_validate(envelope("turn.progress", request_id=str(REQUEST)))


def test_chat_id_in_the_body_may_use_any_uuid_spelling_but_the_key_may_not() -> None:
    upper_body = envelope("turn.progress", request_id=str(REQUEST)) | {"chat_id": str(CHAT).upper()}
    assert decode_provider_event(KEY, raw(upper_body)).chat_id == CHAT


def test_naive_occurred_at_is_read_as_utc() -> None:
    event = decode_turn_request(KEY, raw(minimal_requested() | {"occurred_at": "2025-03-14T15:09:26"}))
    assert event.occurred_at == datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)


def test_offsets_are_kept() -> None:
    event = decode_turn_request(KEY, raw(minimal_requested() | {"occurred_at": "2025-03-14T17:09:26+02:00"}))
    assert event.occurred_at == AT.replace(microsecond=0)


def test_unknown_fields_are_ignored_at_every_level() -> None:
    event = decode_provider_event(
        KEY,
        raw(
            minimal_completed(
                trace_id="abc",
                usage={"input_tokens": 1, "output_tokens": 2, "audio_tokens": 9, "details": {"x": [1]}},
            )
        ),
    )
    assert isinstance(event, TurnCompleted)
    assert "trace_id" not in event.model_dump()
    assert event.usage == Usage(input_tokens=1, output_tokens=2)


def test_null_for_an_optional_field_means_its_default() -> None:
    event = decode_turn_request(
        KEY,
        raw(
            minimal_requested(
                model=None,
                title=None,
                web_search=None,
                code_interpreter=None,
                image_count=None,
                requester_type=None,
            )
        ),
    )
    assert isinstance(event, TurnRequested)
    assert (event.model, event.title, event.web_search, event.image_count, event.requester_type) == (
        None,
        None,
        False,
        0,
        "user",
    )
    usage = decode_usage_event(KEY, raw(minimal_reported(reasoning_tokens=None, model=None)))
    assert isinstance(usage, UsageReported)
    assert usage.reasoning_tokens == 0


@pytest.mark.parametrize("tokens", [0, 1, 10_000_000])
def test_token_counts_at_the_bounds_are_accepted(tokens: int) -> None:
    event = decode_usage_event(KEY, raw(minimal_reported(input_tokens=tokens, web_search_calls=tokens)))
    assert isinstance(event, UsageReported)
    assert event.input_tokens == tokens


def test_title_of_255_characters_is_accepted() -> None:
    event = decode_turn_request(KEY, raw(minimal_requested(title="é" * 255)))
    assert isinstance(event, TurnRequested)
    assert event.title == "é" * 255


def test_payload_of_exactly_one_mebibyte_is_accepted() -> None:
    empty = raw(minimal_requested(content=""))
    value = raw(minimal_requested(content="x" * (MAX_PAYLOAD_BYTES - len(empty))))
    assert len(value) == MAX_PAYLOAD_BYTES
    assert isinstance(decode_turn_request(KEY, value), TurnRequested)


def test_decoded_events_are_frozen() -> None:
    event = decode_turn_request(KEY, raw(minimal_requested()))
    assert isinstance(event, TurnRequested)
    with pytest.raises(ValidationError):
        event.content = "changed"  # type: ignore[misc]


def test_watchdog_events_round_trip_through_to_json_bytes() -> None:
    orphaned = TurnOrphaned(
        event_id=EVENT,
        schema_version=1,
        occurred_at=AT,
        tenant_id=TENANT,
        chat_id=CHAT,
        request_id=REQUEST,
        progress_seq=3,
    )
    assert decode_provider_event(KEY, to_json_bytes(orphaned)) == orphaned
    expired = UsageGraceExpired(
        event_id=EVENT, schema_version=1, occurred_at=AT, tenant_id=TENANT, chat_id=CHAT, request_id=REQUEST
    )
    assert decode_usage_event(KEY, to_json_bytes(expired)) == expired


# --------------------------------------------------------------------------------------------
# Rejecting bad records, with the right dead-letter code
# --------------------------------------------------------------------------------------------

SCHEMA_VIOLATIONS: list[tuple[str, Decoder, dict[str, Any], str]] = [
    ("string for int", decode_turn_request, minimal_requested(image_count="2"), "image_count"),
    ("int for bool", decode_turn_request, minimal_requested(web_search=1), "web_search"),
    ("string for bool", decode_turn_request, minimal_requested(web_search="true"), "web_search"),
    ("float tokens", decode_usage_event, minimal_reported(input_tokens=10.0), "input_tokens"),
    (
        "float inline tokens",
        decode_provider_event,
        minimal_completed(usage={"input_tokens": 1, "output_tokens": 2.5}),
        "usage.output_tokens",
    ),
    ("string tokens", decode_usage_event, minimal_reported(output_tokens="5"), "output_tokens"),
    ("bool tokens", decode_usage_event, minimal_reported(output_tokens=True), "output_tokens"),
    ("negative tokens", decode_usage_event, minimal_reported(input_tokens=-1), "input_tokens"),
    ("too many tokens", decode_usage_event, minimal_reported(input_tokens=10_000_001), "input_tokens"),
    ("too many calls", decode_usage_event, minimal_reported(web_search_calls=10_000_001), "web_search_calls"),
    (
        "negative inline",
        decode_provider_event,
        minimal_completed(usage={"input_tokens": -1, "output_tokens": 0}),
        "usage.input_tokens",
    ),
    (
        "missing request_id",
        decode_turn_request,
        {k: v for k, v in minimal_requested().items() if k != "request_id"},
        "request_id: Field required",
    ),
    (
        "missing content",
        decode_provider_event,
        envelope("turn.cancelled", request_id=str(REQUEST)),
        "content: Field required",
    ),
    (
        "missing usage count",
        decode_usage_event,
        envelope("usage.reported", request_id=str(REQUEST), input_tokens=1),
        "output_tokens: Field required",
    ),
    (
        "missing tenant",
        decode_turn_request,
        {k: v for k, v in minimal_requested().items() if k != "tenant_id"},
        "tenant_id",
    ),
    ("bad uuid", decode_turn_request, minimal_requested(user_id="not-a-uuid"), "user_id"),
    ("uuid as number", decode_provider_event, envelope("turn.progress", request_id=12345), "request_id"),
    ("bad datetime", decode_turn_request, minimal_requested(occurred_at="yesterday"), "occurred_at"),
    ("schema_version 2", decode_turn_request, minimal_requested(schema_version=2), "schema_version"),
    (
        "schema_version as string",
        decode_turn_request,
        minimal_requested(schema_version="1"),
        "schema_version",
    ),
    ("schema_version as bool", decode_turn_request, minimal_requested(schema_version=True), "schema_version"),
    ("schema_version as float", decode_turn_request, minimal_requested(schema_version=1.0), "schema_version"),
    ("null schema_version", decode_turn_request, minimal_requested(schema_version=None), "schema_version"),
    ("negative images", decode_turn_request, minimal_requested(image_count=-1), "image_count"),
    ("title too long", decode_turn_request, minimal_requested(title="t" * 256), "title"),
    ("bad requester_type", decode_turn_request, minimal_requested(requester_type="admin"), "requester_type"),
    ("bad finish_reason", decode_provider_event, minimal_completed(finish_reason="eos"), "finish_reason"),
    ("usage not an object", decode_provider_event, minimal_completed(usage=[1, 2]), "usage"),
    ("NUL in content", decode_turn_request, minimal_requested(content="a\u0000b"), "content"),
    (
        "NUL in error_code",
        decode_provider_event,
        envelope("turn.failed", request_id=str(REQUEST), error_code="x\u0000"),
        "error_code",
    ),
    (
        "negative progress_seq",
        decode_provider_event,
        envelope("turn.orphaned", request_id=str(REQUEST), progress_seq=-1),
        "progress_seq",
    ),
    (
        "missing type",
        decode_turn_request,
        {k: v for k, v in minimal_requested().items() if k != "type"},
        "type: Field required",
    ),
    ("type not a string", decode_turn_request, minimal_requested(type=5), "type"),
    ("null type", decode_turn_request, minimal_requested(type=None), "type"),
]


@pytest.mark.parametrize(
    ("decoder", "value", "where"),
    [case[1:] for case in SCHEMA_VIOLATIONS],
    ids=[c[0] for c in SCHEMA_VIOLATIONS],
)
def test_schema_violations(decoder: Decoder, value: dict[str, Any], where: str) -> None:
    error = decode_error(decoder, raw(value))
    assert error.code == "schema_violation"
    assert where in error.detail


def test_schema_violation_detail_is_readable() -> None:
    error = decode_error(decode_usage_event, raw(minimal_reported(input_tokens=-1, output_tokens=1.5)))
    assert error.detail == (
        "usage.reported: input_tokens: Input should be greater than or equal to 0 [greater_than_equal]; "
        "output_tokens: Input should be a valid integer [int_type]"
    )
    assert str(error) == f"schema_violation: {error.detail}"
    assert isinstance(error, ValueError)


def test_many_violations_are_summarised() -> None:
    error = decode_error(decode_turn_request, raw({"type": "turn.requested"}))
    assert error.code == "schema_violation"
    assert error.detail.startswith("turn.requested: event_id: Field required [missing]; ")
    assert error.detail.endswith("more")


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (b'{"type": "turn.requested",', "Invalid JSON"),
        (b"hello", "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        ('{"type": "turn.requested", "content": "é"}'.encode("latin-1"), "not valid UTF-8"),
        (b'{"type": "turn.requested", "content": "\\ud800"}', "Invalid JSON"),
        (b"\xef\xbb\xbf{}", "Invalid JSON"),
        (b"[]", "not a JSON object"),
        (b'"turn.requested"', "not a JSON object"),
        (b"42", "not a JSON object"),
        (b"null", "not a JSON object"),
    ],
    ids=[
        "truncated",
        "not json",
        "empty",
        "invalid utf-8",
        "latin-1",
        "lone surrogate",
        "byte order mark",
        "array",
        "string",
        "number",
        "null",
    ],
)
def test_malformed_json(value: bytes, detail: str) -> None:
    error = decode_error(decode_turn_request, value)
    assert error.code == "malformed_json"
    assert detail in error.detail


def test_tombstone_is_malformed() -> None:
    assert decode_error(decode_usage_event, None).code == "malformed_json"


@pytest.mark.parametrize(
    ("decoder", "type_"),
    [
        (decode_turn_request, "turn.exploded"),
        (decode_turn_request, "usage.reported"),  # known, but not on this topic
        (decode_provider_event, "turn.requested"),
        (decode_usage_event, "turn.completed"),
        (decode_usage_event, ""),
    ],
)
def test_unknown_type(decoder: Decoder, type_: str) -> None:
    error = decode_error(decoder, raw(minimal_requested(type=type_)))
    assert error.code == "unknown_type"
    assert "is not an event of" in error.detail


def test_payload_too_large_is_checked_before_parsing() -> None:
    value = raw(minimal_requested(content="x" * MAX_PAYLOAD_BYTES))
    error = decode_error(decode_turn_request, value)
    assert error.code == "payload_too_large"
    assert str(len(value)) in error.detail
    not_json = b"\xff" * (MAX_PAYLOAD_BYTES + 1)
    assert decode_error(decode_turn_request, not_json).code == "payload_too_large"


@pytest.mark.parametrize(
    "key",
    [
        str(CHAT).upper().encode(),
        CHAT.hex.encode(),
        f"{{{CHAT}}}".encode(),
        f"{CHAT} ".encode(),
        str(USER).encode(),
        str(TENANT).encode(),
        b"",
        b"\xff\x00",
        None,
    ],
    ids=[
        "uppercase",
        "no hyphens",
        "braces",
        "trailing space",
        "other uuid",
        "tenant",
        "empty",
        "binary",
        "null",
    ],
)
def test_key_mismatch(key: bytes | None) -> None:
    error = decode_error(
        decode_provider_event, raw(envelope("turn.progress", request_id=str(REQUEST))), key=key
    )
    assert error.code == "key_mismatch"
    assert str(CHAT) in error.detail


def test_schema_is_checked_before_the_key() -> None:
    assert decode_error(decode_turn_request, b"[]", key=None).code == "malformed_json"


BAD_WITH_SECRET: list[tuple[str, Decoder, bytes]] = [
    ("content with bad sibling", decode_turn_request, raw(minimal_requested(content=SECRET, user_id="x"))),
    ("content of wrong type", decode_turn_request, raw(minimal_requested(content=[SECRET]))),
    ("content with NUL", decode_turn_request, raw(minimal_requested(content=SECRET + "\u0000"))),
    ("title too long", decode_turn_request, raw(minimal_requested(title=SECRET * 20))),
    ("secret in uuid", decode_turn_request, raw(minimal_requested(user_id=SECRET))),
    ("secret in literal", decode_turn_request, raw(minimal_requested(requester_type=SECRET))),
    ("secret in datetime", decode_turn_request, raw(minimal_requested(occurred_at=SECRET))),
    ("secret in int", decode_usage_event, raw(minimal_reported(input_tokens=SECRET))),
    ("secret in bool", decode_turn_request, raw(minimal_requested(web_search=SECRET))),
    ("secret in schema_version", decode_turn_request, raw(minimal_requested(schema_version=SECRET))),
    ("secret in usage", decode_provider_event, raw(minimal_completed(content=SECRET, usage=SECRET))),
    ("secret as type", decode_turn_request, raw(minimal_requested(type=SECRET))),
    ("secret partial text", decode_provider_event, raw(envelope("turn.cancelled", content=SECRET))),
    ("secret with bad json", decode_turn_request, raw(minimal_requested(content=SECRET))[:-1]),
    ("secret not utf-8", decode_turn_request, raw(minimal_requested(content=SECRET)) + b"\xff"),
    ("secret in array", decode_turn_request, raw([SECRET])),
    ("secret in string", decode_turn_request, raw(SECRET)),
    ("secret oversize", decode_turn_request, raw(minimal_requested(content=SECRET * 60_000))),
]


@pytest.mark.parametrize(
    ("decoder", "value"), [case[1:] for case in BAD_WITH_SECRET], ids=[c[0] for c in BAD_WITH_SECRET]
)
def test_content_never_reaches_the_error_detail(decoder: Decoder, value: bytes) -> None:
    error = decode_error(decoder, value)
    assert "SECRET" not in error.detail
    assert "SECRET" not in str(error)


# --------------------------------------------------------------------------------------------
# Output events
# --------------------------------------------------------------------------------------------


def decision(**fields: Any) -> TurnDecision:
    values: dict[str, Any] = {
        "tenant_id": TENANT,
        "chat_id": CHAT,
        "request_id": REQUEST,
        "command": "turn.requested",
        "command_event_id": EVENT,
        "decision": "allow",
        "turn_id": TURN,
        "effective_model": "gpt-4.1-mini",
        "selected_model": "gpt-4.1-mini",
        "max_output_tokens": 4096,
        "reserve_tokens": 5300,
        "reserved_credits_micro": 1_520_000,
        "policy_version": 3,
        "decided_at": AT,
    }
    return TurnDecision(**(values | fields))


def settled(model: type[UsageSettled | UsageAdjusted] = UsageSettled, **fields: Any) -> Any:
    values: dict[str, Any] = {
        "dedupe_key": dedupe_key(TENANT, TURN, REQUEST, adjusted=model is UsageAdjusted),
        "tenant_id": TENANT,
        "user_id": USER,
        "chat_id": CHAT,
        "turn_id": TURN,
        "request_id": REQUEST,
        "selected_model": "gpt-4.1",
        "effective_model": "gpt-4.1-mini",
        "terminal_state": "completed",
        "billing_outcome": "completed",
        "settlement_method": "actual",
        "usage": Usage(input_tokens=900, output_tokens=300),
        "reserve_tokens": 5300,
        "reserved_credits_micro": 1_520_000,
        "committed_credits_micro": 1_200_000,
        "policy_version_applied": 3,
        "web_search_calls": 1,
        "period_daily": date(2025, 3, 14),
        "period_monthly": date(2025, 3, 1),
        "settled_at": AT,
    }
    if model is UsageAdjusted:
        values["previous_committed_credits_micro"] = 800_000
    return model(**(values | fields))


def dead_letter() -> DeadLetter:
    return DeadLetter.for_record(
        source_topic="minichat.usage",
        partition=3,
        offset=1042,
        error_code="schema_violation",
        error_detail="usage.reported: input_tokens: Field required [missing]",
        value=b'{"type":"usage.reported"}',
        received_at=AT,
    )


def test_turn_decision_serialises_every_field_compactly() -> None:
    body = to_json_bytes(
        decision(decision="downgrade", downgrade_from="gpt-4.1", downgrade_reason="premium_quota_exhausted")
    )
    assert b'": ' not in body and b", " not in body
    parsed = json.loads(body)
    assert parsed["type"] == "turn.decision"
    assert parsed["schema_version"] == 1
    assert parsed["tenant_id"] == str(TENANT)
    assert parsed["decided_at"] == "2025-03-14T15:09:26Z"
    assert parsed["error_code"] is None and parsed["quota_scope"] is None
    assert parsed["replay"] is False
    assert set(parsed) == set(TurnDecision.model_fields)


def test_non_utc_offsets_are_kept_on_output() -> None:
    tz = timezone(timedelta(hours=2))
    assert json.loads(to_json_bytes(decision(decided_at=AT.astimezone(tz))))["decided_at"] == (
        "2025-03-14T17:09:26+02:00"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"replay": True},
        {"decision": "downgrade", "downgrade_from": "gpt-4.1", "downgrade_reason": "model_disabled"},
        {"decision": "reject", "turn_id": None, "error_code": "quota_exceeded", "quota_scope": "web_search"},
        {"decision": "reject", "turn_id": None, "error_code": "chat_not_found", "policy_version": None},
        {"decision": "reject", "turn_id": None, "error_code": "model_required"},
        {"command": "turn.retry", "request_id": NEW_REQUEST},
        {"command": "turn.delete", "decision": "done", "turn_id": None},
        {"command": "chat.delete", "decision": "done", "request_id": None, "turn_id": None},
        {
            "command": "chat.delete",
            "decision": "reject",
            "request_id": None,
            "turn_id": None,
            "error_code": "forbidden",
        },
    ],
)
def test_valid_decisions_round_trip(fields: dict[str, Any]) -> None:
    made = decision(**fields)
    assert OUTPUT_ADAPTER.validate_json(to_json_bytes(made)) == made


@pytest.mark.parametrize(
    "fields",
    [
        {"decision": "reject", "error_code": "quota_exceeded", "quota_scope": "tokens"},  # keeps turn_id
        {"decision": "reject", "turn_id": None},  # no error_code
        {"error_code": "forbidden"},  # allow with an error code
        {"turn_id": None},  # allow without a turn
        {"decision": "reject", "turn_id": None, "error_code": "quota_exceeded"},  # no scope
        {"decision": "reject", "turn_id": None, "error_code": "forbidden", "quota_scope": "tokens"},
        {"decision": "downgrade"},  # no reason
        {"downgrade_reason": "model_disabled"},  # allow with a reason
        {"decision": "done"},  # done for turn.requested
        {"command": "turn.delete"},  # allow for a delete
        {"command": "chat.delete", "decision": "done", "turn_id": None},  # chat.delete with a request_id
        {"request_id": None},
        {"decision": "reject", "turn_id": None, "error_code": "request_id_conflict"},
        {"quota_scope": "uploads"},
        {"decided_at": datetime(2025, 3, 14)},  # naive: not RFC 3339 on output
        {"max_output_tokens": -1},
        {"tenant_id": str(TENANT)},  # outputs are built in code: strict Python types
        {"surprise": 1},
    ],
)
def test_inconsistent_decisions_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        decision(**fields)


def test_dedupe_key() -> None:
    key = dedupe_key(TENANT, TURN, REQUEST)
    assert key == f"{TENANT.hex}/{TURN.hex}/{REQUEST.hex}"
    assert len(key) == 98 and key == key.lower() and "-" not in key
    assert dedupe_key(TENANT, TURN, REQUEST, adjusted=True) == key + "/adjusted"


def test_usage_settled_and_adjusted_round_trip() -> None:
    plain = settled()
    adjusted = settled(UsageAdjusted)
    for event in (plain, adjusted, settled(usage=None, settlement_method="estimated")):
        assert OUTPUT_ADAPTER.validate_json(to_json_bytes(event)) == event
    body = json.loads(to_json_bytes(plain))
    assert body["type"] == "usage.settled"
    assert body["period_daily"] == "2025-03-14" and body["period_monthly"] == "2025-03-01"
    assert body["usage"]["cache_read_input_tokens"] == 0
    assert body["usage"]["model"] is None
    assert json.loads(to_json_bytes(adjusted))["dedupe_key"].endswith("/adjusted")
    assert set(json.loads(to_json_bytes(adjusted))) == set(body) | {"previous_committed_credits_micro"}
    # Siblings: code matching on usage.settled never picks up an adjustment by accident.
    assert not isinstance(adjusted, UsageSettled)


@pytest.mark.parametrize(
    "fields",
    [
        {"dedupe_key": dedupe_key(TENANT, TURN, REQUEST, adjusted=True)},
        {"dedupe_key": dedupe_key(USER, TURN, REQUEST)},
        {"period_monthly": date(2025, 3, 14)},
        {"period_daily": datetime(2025, 3, 14)},
        {"settlement_method": "released", "committed_credits_micro": 5},
        {"terminal_state": "running"},
        {"billing_outcome": "cancelled"},
        {"committed_credits_micro": -1},
    ],
)
def test_inconsistent_settlements_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        settled(**fields)


def test_dead_letter_keeps_utf8_payload_as_text() -> None:
    letter = dead_letter()
    assert (letter.payload, letter.payload_encoding, letter.payload_truncated) == (
        '{"type":"usage.reported"}',
        "utf-8",
        False,
    )
    body = json.loads(to_json_bytes(letter))
    assert body["type"] == "dead_letter"
    assert body["received_at"] == "2025-03-14T15:09:26Z"
    assert OUTPUT_ADAPTER.validate_json(to_json_bytes(letter)) == letter


def test_dead_letter_base64_encodes_binary_payloads() -> None:
    value = b"\xff\xfe" + b"x" * 10
    letter = DeadLetter.for_record(
        source_topic="minichat.turn-requests",
        partition=0,
        offset=0,
        error_code="malformed_json",
        error_detail="value is not valid UTF-8 (byte 0)",
        value=value,
        received_at=AT,
    )
    assert letter.payload_encoding == "base64"
    assert base64.b64decode(letter.payload) == value


def test_dead_letter_truncates_to_64_kib_without_splitting_a_character() -> None:
    value = b"a" + "é".encode() * DEAD_LETTER_PAYLOAD_BYTES  # the cut falls inside an "é"
    letter = DeadLetter.for_record(
        source_topic="minichat.turn-requests",
        partition=0,
        offset=7,
        error_code="payload_too_large",
        error_detail="too big",
        value=value,
        received_at=AT,
    )
    assert letter.payload_truncated
    assert letter.payload_encoding == "utf-8"
    assert letter.payload == "a" + "é" * ((DEAD_LETTER_PAYLOAD_BYTES - 1) // 2)
    binary = DeadLetter.for_record(
        source_topic="t",
        partition=0,
        offset=0,
        error_code="payload_too_large",
        error_detail="too big",
        value=b"\xff" * (DEAD_LETTER_PAYLOAD_BYTES + 10),
        received_at=AT,
    )
    assert binary.payload_truncated
    assert len(base64.b64decode(binary.payload)) == DEAD_LETTER_PAYLOAD_BYTES


def test_dead_letter_of_a_tombstone_has_an_empty_payload() -> None:
    letter = DeadLetter.for_record(
        source_topic="t",
        partition=0,
        offset=0,
        error_code="malformed_json",
        error_detail="record has no value (tombstone)",
        value=None,
        received_at=AT,
    )
    assert (letter.payload, letter.payload_encoding) == ("", "utf-8")


def test_dead_letter_refuses_unknown_codes() -> None:
    with pytest.raises(ValidationError):
        DeadLetter(
            source_topic="t",
            partition=0,
            offset=0,
            error_code="oops",  # type: ignore[arg-type]
            error_detail="",
            payload="",
            payload_encoding="utf-8",
            payload_truncated=False,
            received_at=AT,
        )


def test_code_vocabularies_match_the_contract() -> None:
    assert set(DEAD_LETTER_CODES) == {
        "malformed_json",
        "schema_violation",
        "unknown_type",
        "payload_too_large",
        "key_mismatch",
        "tenant_mismatch",
        "timestamp_type",
        "unprocessable",
        "wrong_partition",
    }
    assert set(DECISION_ERROR_CODES) == {
        "chat_not_found",
        "generation_in_progress",
        "too_many_images",
        "images_disabled",
        "web_search_disabled",
        "input_too_long",
        "quota_exceeded",
        "turn_not_found",
        "not_latest_turn",
        "invalid_turn_state",
        "forbidden",
        "model_required",
    }


def test_model_classes_are_the_ones_exported() -> None:
    assert {
        "turn.requested": TurnRequested,
        "turn.retry": TurnRetry,
        "turn.edit": TurnEdit,
        "turn.delete": TurnDelete,
        "chat.delete": ChatDelete,
        "turn.progress": TurnProgress,
        "turn.completed": TurnCompleted,
        "turn.failed": TurnFailed,
        "turn.cancelled": TurnCancelled,
        "turn.orphaned": TurnOrphaned,
        "usage.reported": UsageReported,
        "usage.grace_expired": UsageGraceExpired,
    } == INPUT_MODELS
