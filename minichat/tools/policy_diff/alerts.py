"""The budget alerts a dry run counts: `quota.threshold_crossed` events, which the settlements
write to the outbox with the books. Counted only where this version of minichat has them (its
policy has `alerts`); the report says `n/a` otherwise."""

from __future__ import annotations

from minichat.models.policy import Policy

ALERT_EVENT = "quota.threshold_crossed"


def alerts_supported() -> bool:
    """Whether the policy, hence the processor, has budget alerts."""
    return "alerts" in Policy.model_fields
