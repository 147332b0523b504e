"""What the processor writes: `turn.decision`, `usage.settled` / `usage.adjusted` and dead letters,
built in code and checked against the contract's rules as they are built."""

from __future__ import annotations

import base64
from datetime import date, datetime
from typing import Annotated, Final, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

from minichat.models.events.fields import NonNegInt, TokenCount, dedupe_key
from minichat.models.events.inputs import Usage
from minichat.models.events.vocabulary import (
    DEAD_LETTER_PAYLOAD_BYTES,
    DELETE_COMMANDS,
    BillingOutcome,
    DeadLetterCode,
    Decision,
    DecisionErrorCode,
    DowngradeReason,
    PayloadEncoding,
    QuotaScope,
    SettlementMethod,
    TerminalState,
    TurnCommandType,
)
from minichat.models.policy import Policy, policy_digest


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


class PolicyVersion(_Output):
    """One policy version in full, on `policy-versions` (keyed by the version): a worker writes it,
    acknowledged, before its first decision under that version; a rebuild reads every one."""

    type: Literal["policy.version"] = "policy.version"
    version: int = Field(ge=1, description="The policy's `version`; also the record key.")
    digest: str = Field(pattern="^[0-9a-f]{64}$", description="sha256 hex of the canonical JSON of `policy`.")
    policy: Policy = Field(description="The policy file's content, as the worker validated it.")

    @model_validator(mode="after")
    def _consistent(self) -> PolicyVersion:
        if self.policy.version != self.version or policy_digest(self.policy) != self.digest:
            raise ValueError("version and digest must be those of the policy")
        return self

    @classmethod
    def of(cls, policy: Policy) -> PolicyVersion:
        return cls(version=policy.version, digest=policy_digest(policy), policy=policy)


InputTopicName = Literal["turn-requests", "provider-responses", "usage"]
"""An input topic's name without the deployment's prefix (the prefix is the deployment's, not the fact's)."""

OrderRun = tuple[InputTopicName, NonNegInt, NonNegInt]
"""(topic, first offset, last offset): consecutive records of one input partition, applied in a row."""


class OrderApplied(_Output):
    """The order in which one committed batch transaction applied the records of one partition set,
    on `order-log` (partition and key: the set). A rebuild applies each set in this order."""

    type: Literal["order.applied"] = "order.applied"
    partition_set: NonNegInt = Field(description="The partition number; also the record's key and partition.")
    runs: list[OrderRun] = Field(
        min_length=1,
        description=(
            "In applied order: [topic, first offset, last offset], every offset of the range in offset "
            "order, in partition `partition_set` of that input topic (no prefix)."
        ),
    )


class QuotaThresholdCrossed(_Output):
    """Settled spend of a user reached a threshold of a limit for the first time in a window, on
    `quota-alerts` (keyed by tenant). At least once: dedupe by `event_id`."""

    type: Literal["quota.threshold_crossed"] = "quota.threshold_crossed"
    event_id: UUID = Field(
        description=(
            'uuid5(NS, "alert:{tenant_id}:{user_id}:{bucket}:{period_type}:{period_start}:'
            '{threshold_percent}"): one per threshold and window, equal on every re-send.'
        )
    )
    tenant_id: UUID
    user_id: UUID
    bucket: Literal["total", "tier:premium"]
    period_type: Literal["daily", "monthly"]
    period_start: date = Field(description="The window's first day (UTC): the day, or the 1st of the month.")
    threshold_percent: int = Field(ge=1, le=100)
    limit_credits_micro: int = Field(gt=0, description="The limit in force for the crossing turn.")
    spent_credits_micro: NonNegInt = Field(description="The window's settled spend after the crossing.")
    request_id: UUID = Field(description="The turn whose settlement or adjustment crossed it.")
    occurred_at: AwareDatetime = Field(description="That settlement's or adjustment's event time.")

    @model_validator(mode="after")
    def _consistent(self) -> QuotaThresholdCrossed:
        if self.period_type == "monthly" and self.period_start.day != 1:
            raise ValueError("a monthly window starts on the 1st")
        if self.spent_credits_micro * 100 < self.threshold_percent * self.limit_credits_micro:
            raise ValueError("spent_credits_micro has not reached threshold_percent of the limit")
        return self


OutputEvent = Annotated[
    TurnDecision | UsageSettled | UsageAdjusted | DeadLetter | QuotaThresholdCrossed,
    Field(discriminator="type"),
]
OUTPUT_ADAPTER: Final[TypeAdapter[OutputEvent]] = TypeAdapter(OutputEvent)

OUTPUT_MODELS: Final[dict[str, type[_Output]]] = {
    model.model_fields["type"].default: model
    for model in (
        TurnDecision,
        UsageSettled,
        UsageAdjusted,
        DeadLetter,
        QuotaThresholdCrossed,
        PolicyVersion,
        OrderApplied,
    )
}
