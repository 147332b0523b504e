"""The codes a gateway sends and reads, as constants: a typo is then a NameError, not an
unknown code that settles as an estimated charge (docs/contract.md, "Codes")."""

from __future__ import annotations

from enum import StrEnum


class FailureCode(StrEnum):
    """The `error_code` of `turn.failed` (`GatewayClient.failed`): it picks how the turn settles.
    Any other string is accepted and settles `failed` / `estimated`, counted as an unknown code."""

    ORPHAN_TIMEOUT = "orphan_timeout"
    """Sent by minichat's watchdog, not by a gateway: aborted, estimated."""
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    """The provider refused the input as too long: released, charge 0."""
    VALIDATION_ERROR = "validation_error"
    """The provider refused the request as invalid: released, charge 0."""
    PROVIDER_NOT_CALLED = "provider_not_called"
    """The gateway never called the provider: released, charge 0."""
    PROVIDER_ERROR = "provider_error"
    """The provider failed: actual when usage is known, else estimated."""
    PROVIDER_TIMEOUT = "provider_timeout"
    RATE_LIMITED = "rate_limited"
    WEB_SEARCH_CALLS_EXCEEDED = "web_search_calls_exceeded"
    CODE_INTERPRETER_CALLS_EXCEEDED = "code_interpreter_calls_exceeded"


class RejectCode(StrEnum):
    """The `error_code` of a `reject` decision (`TurnDecision.error_code`); what a gateway does on
    each: docs/gateway-guide.md, "Decisions and what to do"."""

    CHAT_NOT_FOUND = "chat_not_found"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    TOO_MANY_IMAGES = "too_many_images"
    IMAGES_DISABLED = "images_disabled"
    WEB_SEARCH_DISABLED = "web_search_disabled"
    INPUT_TOO_LONG = "input_too_long"
    QUOTA_EXCEEDED = "quota_exceeded"
    MODEL_REQUIRED = "model_required"
    TURN_NOT_FOUND = "turn_not_found"
    NOT_LATEST_TURN = "not_latest_turn"
    INVALID_TURN_STATE = "invalid_turn_state"
    FORBIDDEN = "forbidden"
