"""The contract's limits and closed vocabularies: event types, decisions, error codes, states."""

from __future__ import annotations

from typing import Final, Literal, get_args

from minichat.models.bounds import MAX_TOKENS

MAX_PAYLOAD_BYTES: Final = 1_048_576
"""Records above 1 MiB are dead-lettered before any parsing."""

DEAD_LETTER_PAYLOAD_BYTES: Final = 65_536
"""A dead letter keeps at most this many bytes of the original value."""

MAX_TOKEN_COUNT: Final = MAX_TOKENS

TopicKind = Literal["turn-requests", "provider-responses", "usage"]

TurnCommandType = Literal["turn.requested", "turn.retry", "turn.edit", "turn.delete", "chat.delete"]
ProviderEventType = Literal[
    "turn.progress", "turn.completed", "turn.failed", "turn.cancelled", "turn.orphaned"
]
UsageEventType = Literal["usage.reported", "usage.grace_expired"]
OutputEventType = Literal[
    "turn.decision", "usage.settled", "usage.adjusted", "dead_letter", "quota.threshold_crossed"
]

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
    "wrong_partition",
]
PayloadEncoding = Literal["utf-8", "base64"]

DECISION_ERROR_CODES: Final[tuple[DecisionErrorCode, ...]] = get_args(DecisionErrorCode)
DEAD_LETTER_CODES: Final[tuple[DeadLetterCode, ...]] = get_args(DeadLetterCode)
DELETE_COMMANDS: Final[frozenset[TurnCommandType]] = frozenset({"turn.delete", "chat.delete"})
