"""Topic names and settings (docs/contract.md, "Topics"; names are given without the prefix)."""

from __future__ import annotations

from dataclasses import dataclass

TURN_REQUESTS = "turn-requests"
PROVIDER_RESPONSES = "provider-responses"
USAGE = "usage"
TURN_DECISIONS = "turn-decisions"
BILLING_USAGE = "billing-usage"
DEAD_LETTERS = "dead-letters"
POLICY_VERSIONS = "policy-versions"
ORDER_LOG = "order-log"
QUOTA_ALERTS = "quota-alerts"

INPUT_TOPICS = (TURN_REQUESTS, PROVIDER_RESPONSES, USAGE)
ALL_TOPICS = (
    TURN_REQUESTS,
    PROVIDER_RESPONSES,
    USAGE,
    TURN_DECISIONS,
    BILLING_USAGE,
    DEAD_LETTERS,
    POLICY_VERSIONS,
    ORDER_LOG,
    QUOTA_ALERTS,
)

# Every topic keeps its records forever and stamps them on append: the record timestamp is the
# event time. The contract requires it for the inputs and turn-decisions; billing events and dead
# letters are money and evidence, so they are kept the same way.
TOPIC_CONFIG: dict[str, str] = {
    "retention.ms": "-1",
    "retention.bytes": "-1",
    "message.timestamp.type": "LogAppendTime",
    # Above the processor's 1 MiB payload limit, so an oversized record reaches the processor and
    # is dead-lettered `payload_too_large` (with a reason) instead of being refused at produce time.
    "max.message.bytes": str(4 * 1024 * 1024),
}

COMPACTED: dict[str, dict[str, str]] = {POLICY_VERSIONS: {"cleanup.policy": "compact"}}
"""Topics keyed by a fact's identity (a policy version): compaction keeps the latest copy of each
key forever (retention never deletes), so a rebuild always finds every version."""


def topic_config(name: str) -> dict[str, str]:
    """The settings of topic `name` (given without the prefix)."""
    return {**TOPIC_CONFIG, **COMPACTED.get(name, {})}


@dataclass(frozen=True)
class TopicNames:
    """The topic names of one deployment (prefix applied)."""

    prefix: str

    def full(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def turn_requests(self) -> str:
        return self.full(TURN_REQUESTS)

    @property
    def provider_responses(self) -> str:
        return self.full(PROVIDER_RESPONSES)

    @property
    def usage(self) -> str:
        return self.full(USAGE)

    @property
    def turn_decisions(self) -> str:
        return self.full(TURN_DECISIONS)

    @property
    def billing_usage(self) -> str:
        return self.full(BILLING_USAGE)

    @property
    def dead_letters(self) -> str:
        return self.full(DEAD_LETTERS)

    @property
    def policy_versions(self) -> str:
        return self.full(POLICY_VERSIONS)

    @property
    def order_log(self) -> str:
        return self.full(ORDER_LOG)

    @property
    def quota_alerts(self) -> str:
        return self.full(QUOTA_ALERTS)

    def config(self, full_name: str) -> dict[str, str]:
        """The settings of a topic given by its full (prefixed) name."""
        return topic_config(full_name.removeprefix(self.prefix))

    def all(self) -> list[str]:
        return [self.full(name) for name in ALL_TOPICS]

    def inputs(self) -> list[str]:
        """The topics gateways write and the worker consumes."""
        return [self.turn_requests, self.provider_responses, self.usage]
