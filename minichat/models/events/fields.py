"""Field types of the events: strict, bounded like the columns that store them, never U+0000; and
billing's idempotency key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StringConstraints,
)
from pydantic_core import PydanticCustomError, PydanticUseDefault

from minichat.models.bounds import INT4_MAX, INT8_MAX
from minichat.models.events.vocabulary import MAX_TOKEN_COUNT


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


def null_is_default(value: Any) -> Any:
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

OptionalCount = Annotated[TokenCount, BeforeValidator(null_is_default)]
"""A count that may be omitted (or null) and then is 0."""

ImageCount = Annotated[int, Field(ge=0, le=INT4_MAX, strict=True), BeforeValidator(null_is_default)]
Flag = Annotated[bool, BeforeValidator(null_is_default)]

NonNegInt = Annotated[int, Field(ge=0, le=INT8_MAX, strict=True)]
SchemaVersion = Annotated[Literal[1], BeforeValidator(_exact_int)]
OccurredAt = Annotated[datetime, AfterValidator(_utc_if_naive)]
"""Informational only, so a missing offset is read as UTC rather than dead-lettered."""


def dedupe_key(tenant_id: UUID, turn_id: UUID, request_id: UUID, adjusted: bool = False) -> str:
    """Billing's idempotency key: `{tenant}/{turn}/{request}` as 32-digit lowercase hex."""
    key = f"{tenant_id.hex}/{turn_id.hex}/{request_id.hex}"
    return f"{key}/adjusted" if adjusted else key
