"""Wire models of every event (docs/contract.md, "Envelope", "Input events",
"Output events") and the decoder that guards the input topics.

Inputs are decoded once, from the record's bytes, with `validate_json`. Everything is strict (no
`"5"` -> 5, no `1` -> true, no `1.0` token counts); UUIDs and datetimes still parse from JSON
strings because that is how JSON spells them. Decisions where the contract is silent:
`docs/schemas/README.md`.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, Final, Literal, TypeVar, get_args
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticUseDefault

from minichat.models.bounds import INT4_MAX, INT8_MAX, MAX_TOKENS

# --------------------------------------------------------------------------------------------
# Limits and vocabularies
# --------------------------------------------------------------------------------------------

MAX_PAYLOAD_BYTES: Final = 1_048_576
"""Records above 1 MiB are dead-lettered before any parsing."""

DEAD_LETTER_PAYLOAD_BYTES: Final = 65_536
"""A dead letter keeps at most this many bytes of the original value."""

MAX_TOKEN_COUNT: Final = MAX_TOKENS
_INT4_MAX: Final = INT4_MAX
_INT8_MAX: Final = INT8_MAX

TopicKind = Literal["turn-requests", "provider-responses", "usage"]

TurnCommandType = Literal["turn.requested", "turn.retry", "turn.edit", "turn.delete", "chat.delete"]
ProviderEventType = Literal[
    "turn.progress", "turn.completed", "turn.failed", "turn.cancelled", "turn.orphaned"
]
UsageEventType = Literal["usage.reported", "usage.grace_expired"]
OutputEventType = Literal["turn.decision", "usage.settled", "usage.adjusted", "dead_letter"]

RequesterType = Literal["user", "system"]
FinishReason = Literal["stop", "length", "content_filter", "other"]

Decision = Literal["allow", "downgrade", "reject", "done"]
QuotaScope = Literal["tokens", "web_search", "code_interpreter"]
DowngradeReason = Literal[
    "premium_quota_exhausted", "force_standard_tier", "disable_premium_tier", "model_disabled"
]
DecisionErrorCode = Literal[
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
    # Not named by the contract: a turn.requested that creates a chat without `model`.
    "model_required",
]

TurnState = Literal["running", "completed", "failed", "cancelled"]
TerminalState = Literal["completed", "failed", "cancelled"]
BillingOutcome = Literal["completed", "aborted", "failed"]
SettlementMethod = Literal["actual", "estimated", "released"]

DeadLetterCode = Literal[
    "malformed_json",
    "schema_violation",
    "unknown_type",
    "payload_too_large",
    "key_mismatch",
    "tenant_mismatch",
    "timestamp_type",
    "unprocessable",
]
PayloadEncoding = Literal["utf-8", "base64"]

DECISION_ERROR_CODES: Final[tuple[DecisionErrorCode, ...]] = get_args(DecisionErrorCode)
DEAD_LETTER_CODES: Final[tuple[DeadLetterCode, ...]] = get_args(DeadLetterCode)
DELETE_COMMANDS: Final[frozenset[TurnCommandType]] = frozenset({"turn.delete", "chat.delete"})

# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


def _reject_nul(value: str) -> str:
    # Postgres text and jsonb cannot hold U+0000: such a record would fail at insert time and
    # stall its partition, so it is refused at the edge instead.
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "String must not contain U+0000")
    return value


def _exact_int(value: Any) -> Any:
    # `Literal[1]` alone accepts 1.0 and true even in strict mode (they hash equal to 1).
    if type(value) is not int:
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _null_is_default(value: Any) -> Any:
    # Producers that serialise unset options as `null` mean "use the default". A field-level
    # validator on JSON-native types only: a model-level "before" validator would switch pydantic
    # to Python-mode strictness, where UUIDs and datetimes no longer parse from strings.
    if value is None:
        raise PydanticUseDefault()
    return value


def _utc_if_naive(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Text = Annotated[str, AfterValidator(_reject_nul)]
"""A string from a gateway: anything but U+0000."""

Title = Annotated[str, StringConstraints(max_length=255), AfterValidator(_reject_nul)]
# Bounded like the columns that store them: a wider value is a schema violation at the edge, not
# a failed insert that would stop its partition.
ModelName = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_reject_nul)]
ProviderResponseId = Annotated[str, StringConstraints(max_length=128), AfterValidator(_reject_nul)]
ErrorCode = Annotated[str, StringConstraints(max_length=64), AfterValidator(_reject_nul)]

TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKEN_COUNT, strict=True)]
"""Token and call counts: integers in 0..=10_000_000 (docs/contract.md, "Input events")."""

OptionalCount = Annotated[TokenCount, BeforeValidator(_null_is_default)]
"""A count that may be omitted (or null) and then is 0."""

ImageCount = Annotated[int, Field(ge=0, le=_INT4_MAX, strict=True), BeforeValidator(_null_is_default)]
Flag = Annotated[bool, BeforeValidator(_null_is_default)]

NonNegInt = Annotated[int, Field(ge=0, le=_INT8_MAX, strict=True)]
SchemaVersion = Annotated[Literal[1], BeforeValidator(_exact_int)]
OccurredAt = Annotated[datetime, AfterValidator(_utc_if_naive)]
"""Informational only, so a missing offset is read as UTC rather than dead-lettered."""


def dedupe_key(tenant_id: UUID, turn_id: UUID, request_id: UUID, adjusted: bool = False) -> str:
    """Billing's idempotency key: `{tenant}/{turn}/{request}` as 32-digit lowercase hex."""
    key = f"{tenant_id.hex}/{turn_id.hex}/{request_id.hex}"
    return f"{key}/adjusted" if adjusted else key


# --------------------------------------------------------------------------------------------
# Input events
# --------------------------------------------------------------------------------------------


def _require_type(schema: JsonDict) -> None:
    # `type` has a default for convenient construction, but on the wire it is required.
    required = schema.get("required")
    names = list(required) if isinstance(required, list) else []
    if "type" not in names:
        schema["required"] = ["type", *names]


class _Input(BaseModel):
    """Base of everything a gateway writes: strict, immutable, unknown fields ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class _UsageCounts(_Input):
    input_tokens: TokenCount
    output_tokens: TokenCount
    cache_read_input_tokens: OptionalCount = 0
    cache_write_input_tokens: OptionalCount = 0
    reasoning_tokens: OptionalCount = 0
    web_search_calls: OptionalCount = 0
    code_interpreter_calls: OptionalCount = 0
    model: ModelName | None = None


class Usage(_UsageCounts):
    """Provider usage of one turn; the cache and reasoning counts are subsets, not additions."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    @property
    def known(self) -> bool:
        """Usage counts as known when `in + out > 0` (docs/contract.md, "Usage object")."""
        return self.input_tokens + self.output_tokens > 0


class Envelope(_Input):
    """docs/contract.md, "Envelope". Event time is the record timestamp, never `occurred_at`."""

    model_config = ConfigDict(json_schema_extra=_require_type)

    type: str
    event_id: UUID
    schema_version: SchemaVersion
    occurred_at: OccurredAt
    tenant_id: UUID
    chat_id: UUID


class TurnRequested(Envelope):
    """A user sends a message; the first accepted one of an unknown chat creates the chat."""

    type: Literal["turn.requested"] = "turn.requested"
    user_id: UUID
    request_id: UUID = Field(description="Idempotency key of the turn.")
    content: Text
    model: ModelName | None = Field(
        default=None, description="Selected model; required when the chat is new, ignored afterwards."
    )
    title: Title | None = None
    web_search: Flag = False
    code_interpreter: Flag = False
    image_count: ImageCount = 0
    requester_type: Annotated[RequesterType, BeforeValidator(_null_is_default)] = "user"


class TurnRetry(Envelope):
    """Regenerate the latest turn."""

    type: Literal["turn.retry"] = "turn.retry"
    user_id: UUID
    request_id: UUID = Field(description="The turn to replace.")
    new_request_id: UUID = Field(description="Idempotency key of the new turn.")


class TurnEdit(Envelope):
    """Regenerate the latest turn from edited user text."""

    type: Literal["turn.edit"] = "turn.edit"
    user_id: UUID
    request_id: UUID = Field(description="The turn to replace.")
    new_request_id: UUID = Field(description="Idempotency key of the new turn.")
    content: Text


class TurnDelete(Envelope):
    """Soft-delete the latest, terminal turn."""

    type: Literal["turn.delete"] = "turn.delete"
    user_id: UUID
    request_id: UUID


class ChatDelete(Envelope):
    """Soft-delete the chat; a running turn still finishes and settles."""

    type: Literal["chat.delete"] = "chat.delete"
    user_id: UUID


class TurnProgress(Envelope):
    """The provider stream is alive."""

    type: Literal["turn.progress"] = "turn.progress"
    request_id: UUID


class TurnCompleted(Envelope):
    """The provider finished the answer."""

    type: Literal["turn.completed"] = "turn.completed"
    request_id: UUID
    content: Text
    provider_response_id: ProviderResponseId | None = None
    finish_reason: Annotated[FinishReason, BeforeValidator(_null_is_default)] = "stop"
    usage: Usage | None = None


class TurnFailed(Envelope):
    """The turn failed; `error_code` picks the settlement path (docs/contract.md, "Failure codes")."""

    type: Literal["turn.failed"] = "turn.failed"
    request_id: UUID
    error_code: ErrorCode
    error_detail: Text | None = None
    usage: Usage | None = None


class TurnCancelled(Envelope):
    """The client went away; `content` is the partial text and may be empty."""

    type: Literal["turn.cancelled"] = "turn.cancelled"
    request_id: UUID
    content: Text
    usage: Usage | None = None


class TurnOrphaned(Envelope):
    """Watchdog only: applies while the turn runs and its `progress_seq` still matches."""

    type: Literal["turn.orphaned"] = "turn.orphaned"
    request_id: UUID
    progress_seq: NonNegInt


class UsageReported(_UsageCounts, Envelope):
    """Provider usage of a turn, possibly after its terminal event."""

    type: Literal["usage.reported"] = "usage.reported"
    request_id: UUID

    def to_usage(self) -> Usage:
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens,
            cache_write_input_tokens=self.cache_write_input_tokens,
            reasoning_tokens=self.reasoning_tokens,
            web_search_calls=self.web_search_calls,
            code_interpreter_calls=self.code_interpreter_calls,
            model=self.model,
        )


class UsageGraceExpired(Envelope):
    """Watchdog only: usage did not arrive within `usage_grace_s`; settle as estimated."""

    type: Literal["usage.grace_expired"] = "usage.grace_expired"
    request_id: UUID


TurnRequestEvent = Annotated[
    TurnRequested | TurnRetry | TurnEdit | TurnDelete | ChatDelete, Field(discriminator="type")
]
ProviderEvent = Annotated[
    TurnProgress | TurnCompleted | TurnFailed | TurnCancelled | TurnOrphaned, Field(discriminator="type")
]
UsageEvent = Annotated[UsageReported | UsageGraceExpired, Field(discriminator="type")]
InputEvent = (
    TurnRequested
    | TurnRetry
    | TurnEdit
    | TurnDelete
    | ChatDelete
    | TurnProgress
    | TurnCompleted
    | TurnFailed
    | TurnCancelled
    | TurnOrphaned
    | UsageReported
    | UsageGraceExpired
)

TURN_REQUEST_ADAPTER: Final[TypeAdapter[TurnRequestEvent]] = TypeAdapter(TurnRequestEvent)
PROVIDER_ADAPTER: Final[TypeAdapter[ProviderEvent]] = TypeAdapter(ProviderEvent)
USAGE_ADAPTER: Final[TypeAdapter[UsageEvent]] = TypeAdapter(UsageEvent)

# --------------------------------------------------------------------------------------------
# Output events
# --------------------------------------------------------------------------------------------


class _Output(BaseModel):
    """Base of everything the processor writes: built in code, so unknown fields are a bug."""

    model_config = ConfigDict(
        strict=True, frozen=True, extra="forbid", json_schema_serialization_defaults_required=True
    )

    type: str
    schema_version: Literal[1] = 1


class TurnDecision(_Output):
    """Exactly one per command on turn-requests; re-sent with `replay: true` for duplicates."""

    type: Literal["turn.decision"] = "turn.decision"
    tenant_id: UUID
    chat_id: UUID
    request_id: UUID | None = Field(
        description="Retry/edit: the new request; turn.delete: the deleted turn's; chat.delete: null."
    )
    command: TurnCommandType
    command_event_id: UUID
    decision: Decision
    turn_id: UUID | None = None
    effective_model: str | None = None
    selected_model: str | None = None
    max_output_tokens: NonNegInt | None = None
    reserve_tokens: NonNegInt | None = None
    reserved_credits_micro: NonNegInt | None = None
    policy_version: int | None = None
    downgrade_from: str | None = None
    downgrade_reason: DowngradeReason | None = None
    error_code: DecisionErrorCode | None = None
    quota_scope: QuotaScope | None = None
    replay: bool = False
    decided_at: AwareDatetime = Field(description="Event time of the command (its record timestamp).")

    @model_validator(mode="after")
    def _consistent(self) -> TurnDecision:
        # Each rule is a sentence of docs/contract.md, "`turn.decision`"; breaking one is a processor bug.
        if (self.decision == "reject") != (self.error_code is not None):
            raise ValueError("error_code is set exactly when decision is reject")
        if self.decision == "reject" and self.turn_id is not None:
            raise ValueError("a rejected command has no turn_id")
        if self.decision in ("allow", "downgrade") and self.turn_id is None:
            raise ValueError("an accepted turn has a turn_id")
        if (self.error_code == "quota_exceeded") != (self.quota_scope is not None):
            raise ValueError("quota_scope is set exactly when error_code is quota_exceeded")
        if self.decision == "downgrade" and self.downgrade_reason is None:
            raise ValueError("a downgrade names its downgrade_reason")
        if self.decision == "allow" and (self.downgrade_reason or self.downgrade_from):
            raise ValueError("an allow has no downgrade fields")
        if (self.decision == "done") != (self.command in DELETE_COMMANDS and self.decision != "reject"):
            raise ValueError("done answers exactly the accepted turn.delete and chat.delete")
        if (self.request_id is None) != (self.command == "chat.delete"):
            raise ValueError("request_id is null exactly for chat.delete")
        return self


class _Settlement(_Output):
    """Fields shared by `usage.settled` and `usage.adjusted` (siblings, so neither matches the other)."""

    dedupe_key: str
    tenant_id: UUID
    user_id: UUID
    chat_id: UUID
    turn_id: UUID
    request_id: UUID
    selected_model: str
    effective_model: str
    terminal_state: TerminalState
    billing_outcome: BillingOutcome
    settlement_method: SettlementMethod
    error_code: str | None = None
    usage: Usage | None = None
    reserve_tokens: NonNegInt
    reserved_credits_micro: NonNegInt
    committed_credits_micro: NonNegInt
    overshoot_capped: bool = False
    policy_version_applied: int
    web_search_calls: TokenCount = 0
    code_interpreter_calls: TokenCount = 0
    period_daily: date
    period_monthly: date
    settled_at: AwareDatetime

    @model_validator(mode="after")
    def _consistent(self) -> _Settlement:
        adjusted = self.type == "usage.adjusted"
        if self.dedupe_key != dedupe_key(self.tenant_id, self.turn_id, self.request_id, adjusted):
            raise ValueError("dedupe_key does not match tenant_id, turn_id and request_id")
        if self.period_monthly != self.period_daily.replace(day=1):
            raise ValueError("period_monthly must be the 1st of period_daily's month")
        if self.settlement_method == "released" and self.committed_credits_micro != 0:
            raise ValueError("a released settlement charges nothing")
        return self


class UsageSettled(_Settlement):
    """The charge of one accepted turn; billing must never recompute `committed_credits_micro`."""

    type: Literal["usage.settled"] = "usage.settled"


class UsageAdjusted(_Settlement):
    """Late usage re-priced an estimated settlement to actual, on the same period rows."""

    type: Literal["usage.adjusted"] = "usage.adjusted"
    previous_committed_credits_micro: NonNegInt


class DeadLetter(_Output):
    """A record that could not be applied; its partition moved on without it."""

    type: Literal["dead_letter"] = "dead_letter"
    source_topic: str
    partition: NonNegInt
    offset: NonNegInt
    error_code: DeadLetterCode
    error_detail: str = Field(description="What was wrong; never message content.")
    payload: str = Field(description="The original value: text, or base64 when it is not UTF-8.")
    payload_encoding: PayloadEncoding
    payload_truncated: bool = Field(description="True when only the first 64 KiB are kept.")
    received_at: AwareDatetime

    @classmethod
    def for_record(
        cls,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        error_code: DeadLetterCode,
        error_detail: str,
        value: bytes | None,
        received_at: datetime,
    ) -> DeadLetter:
        """Dead letter of one record, with the payload encoded and truncated as the contract says."""
        raw = value or b""
        head = raw[:DEAD_LETTER_PAYLOAD_BYTES]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            payload = base64.b64encode(head).decode("ascii")
            encoding: PayloadEncoding = "base64"
        else:
            # The cut may split a multi-byte character; drop that partial tail only.
            payload = head.decode("utf-8", errors="ignore")
            encoding = "utf-8"
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            error_code=error_code,
            error_detail=error_detail,
            payload=payload,
            payload_encoding=encoding,
            payload_truncated=len(raw) > DEAD_LETTER_PAYLOAD_BYTES,
            received_at=received_at,
        )


OutputEvent = Annotated[TurnDecision | UsageSettled | UsageAdjusted | DeadLetter, Field(discriminator="type")]
OUTPUT_ADAPTER: Final[TypeAdapter[OutputEvent]] = TypeAdapter(OutputEvent)

INPUT_MODELS: Final[dict[str, type[Envelope]]] = {
    model.model_fields["type"].default: model
    for model in (
        TurnRequested,
        TurnRetry,
        TurnEdit,
        TurnDelete,
        ChatDelete,
        TurnProgress,
        TurnCompleted,
        TurnFailed,
        TurnCancelled,
        TurnOrphaned,
        UsageReported,
        UsageGraceExpired,
    )
}
OUTPUT_MODELS: Final[dict[str, type[_Output]]] = {
    model.model_fields["type"].default: model
    for model in (TurnDecision, UsageSettled, UsageAdjusted, DeadLetter)
}


def to_json_bytes(event: BaseModel) -> bytes:
    """Compact JSON: UUIDs as strings, datetimes RFC 3339 (`Z` for UTC), None as null."""
    return event.model_dump_json().encode("utf-8")


# --------------------------------------------------------------------------------------------
# Decoding the input topics
# --------------------------------------------------------------------------------------------


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
        event = adapter.validate_json(value)
    except ValidationError as exc:
        raise _classify(exc, topic, value) from None
    expected = str(event.chat_id).encode("ascii")
    if key != expected:
        raise DecodeError("key_mismatch", f"record key {_describe_key(key)} is not chat_id {event.chat_id}")
    return event


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
