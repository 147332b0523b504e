"""A decision `turn-decisions` recorded, as the outcome a rebuild (`minichat replay`) applies
instead of deciding again: quota rows are shared by a user's chats on every partition, so a
fresh decision could differ from what the live workers decided."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minichat.domain.admission import RecordedOutcome


def recorded_outcome(payload: Mapping[str, Any]) -> RecordedOutcome | None:
    """A `turn.decision` payload as the outcome a rebuild applies; None for a decision that did
    not come from the quota rules (deletes)."""
    decision = payload.get("decision")
    version = payload.get("policy_version")
    if decision not in ("allow", "downgrade", "reject") or version is None:
        return None
    return RecordedOutcome(
        decision=decision,
        policy_version=int(version),
        error_code=payload.get("error_code"),
        quota_scope=payload.get("quota_scope"),
        effective_model=payload.get("effective_model"),
        downgrade_from=payload.get("downgrade_from"),
        downgrade_reason=payload.get("downgrade_reason"),
        max_output_tokens=payload.get("max_output_tokens"),
        reserve_tokens=payload.get("reserve_tokens"),
        reserved_credits_micro=payload.get("reserved_credits_micro"),
    )
