"""What a gateway writes: the commands of `turn-requests`, the facts of `provider-responses` and
`usage` (and the watchdog's signals there), strict and immutable."""

from __future__ import annotations

from typing import Annotated, Final, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
)
from pydantic.config import JsonDict

from minichat.models.events.fields import (
    ErrorCode,
    Flag,
    ImageCount,
    ModelName,
    NonNegInt,
    OccurredAt,
    OptionalCount,
    ProviderResponseId,
    SchemaVersion,
    Text,
    Title,
    TokenCount,
    null_is_default,
)
from minichat.models.events.vocabulary import FinishReason, RequesterType


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


class After(BaseModel):
    """A command's causal token: offsets, in the chat's partition of `provider-responses` and
    `usage`, of records its partition set must have applied before the command (docs/contract.md,
    "Causal token `after`"). Strict: an unknown key is a schema violation, not ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", serialize_by_alias=True)

    provider_responses: NonNegInt | None = Field(default=None, alias="provider-responses")
    usage: NonNegInt | None = None

    @classmethod
    def of(cls, provider_responses: int | None = None, usage: int | None = None) -> After:
        """Built from Python names (the wire accepts only `provider-responses` and `usage`)."""
        return cls.model_validate({"provider-responses": provider_responses, "usage": usage})

    def offsets(self) -> dict[str, int]:
        """The named offsets by contract key (`provider-responses`, `usage`)."""
        return self.model_dump(by_alias=True, exclude_none=True)


AfterField = Annotated[
    After | None,
    BeforeValidator(null_is_default),
    Field(
        description="Apply this command only after its partition set applied these records.",
        exclude_if=lambda value: value is None,  # absent on the wire when it names nothing
    ),
]


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
    requester_type: Annotated[RequesterType, BeforeValidator(null_is_default)] = "user"
    after: AfterField = None


class TurnRetry(Envelope):
    """Regenerate the latest turn."""

    type: Literal["turn.retry"] = "turn.retry"
    user_id: UUID
    request_id: UUID = Field(description="The turn to replace.")
    new_request_id: UUID = Field(description="Idempotency key of the new turn.")
    after: AfterField = None


class TurnEdit(Envelope):
    """Regenerate the latest turn from edited user text."""

    type: Literal["turn.edit"] = "turn.edit"
    user_id: UUID
    request_id: UUID = Field(description="The turn to replace.")
    new_request_id: UUID = Field(description="Idempotency key of the new turn.")
    content: Text
    after: AfterField = None


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
    finish_reason: Annotated[FinishReason, BeforeValidator(null_is_default)] = "stop"
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
