"""What a simulated gateway's traffic is made of: how a turn's provider side ends (`Outcome`), the
flags that make a turn awkward (duplicates, early and out-of-order events), the mutations, the
demo tenant and its limit user, and the rates of each. `plan.py` draws a run from these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal
from uuid import UUID

from minichat.domain.settlement import RELEASED_CODES, USAGE_CODES
from minichat.settings import PACKAGED_POLICY

DEMO_POLICY: Final = PACKAGED_POLICY.with_name("demo_policy.yaml")
DEMO_TENANT_ID: Final = UUID("de300000-0000-4000-8000-00000000de30")
"""The tenant with tiny limits in `demo_policy.yaml`; the simulator's limit user lives there."""

UNKNOWN_ERROR_CODE: Final = "upstream_protocol_error"
"""A failure code the contract's settlement table does not name (settled as estimated)."""

FAILURE_CODES: Final[tuple[str, ...]] = (*sorted(USAGE_CODES), *sorted(RELEASED_CODES), UNKNOWN_ERROR_CODE)

Terminal = Literal["completed", "failed", "cancelled"]
UsageMode = Literal["inline", "after", "before", "late", "none"]
"""Where the usage goes: in the terminal event; a `usage.reported` after it, or before it (out of
order); after the processor settled the turn as estimated (-> `usage.adjusted`); or never (the
watchdog's `usage.grace_expired` path)."""
TurnCommand = Literal["turn.requested", "turn.retry", "turn.edit"]
Mutation = Literal["turn.retry", "turn.edit", "turn.delete"]
MUTATIONS: Final[tuple[Mutation, ...]] = ("turn.retry", "turn.edit", "turn.delete")
Flag = Literal[
    "early", "duplicate-command", "duplicate-terminal", "duplicate-usage", "second-terminal", "overshoot"
]

FLAGS: Final[tuple[Flag, ...]] = (
    "early",
    "duplicate-command",
    "duplicate-terminal",
    "duplicate-usage",
    "second-terminal",
    "overshoot",
)


@dataclass(frozen=True)
class Outcome:
    """How the provider side of one accepted turn ends."""

    terminal: Terminal
    usage: UsageMode
    error_code: str | None = None
    partial_text: bool = False
    """cancelled: the partial answer has text (else it is empty)."""

    @property
    def label(self) -> str:
        if self.terminal == "failed":
            return f"failed:{self.error_code}"
        if self.terminal == "cancelled":
            return "cancelled/text" if self.partial_text else "cancelled/empty"
        return f"completed/{self.usage}"


REQUIRED_OUTCOMES: Final[tuple[Outcome, ...]] = (
    Outcome("completed", "inline"),
    Outcome("completed", "after"),
    Outcome("completed", "before"),
    Outcome("completed", "none"),
    Outcome("completed", "late"),
    Outcome("failed", "inline", "provider_error"),
    Outcome("failed", "after", "provider_timeout"),
    Outcome("failed", "none", "rate_limited"),
    Outcome("failed", "before", "web_search_calls_exceeded"),
    Outcome("failed", "late", "code_interpreter_calls_exceeded"),
    Outcome("failed", "none", "context_length_exceeded"),
    Outcome("failed", "none", "validation_error"),
    Outcome("failed", "none", "provider_not_called"),
    Outcome("failed", "none", UNKNOWN_ERROR_CODE),
    Outcome("cancelled", "inline", partial_text=True),
    Outcome("cancelled", "none", partial_text=False),
)

SCENARIO_KINDS: Final[frozenset[str]] = frozenset(
    {o.label for o in REQUIRED_OUTCOMES}
    | set(FLAGS)
    | {"turn.retry", "turn.edit", "turn.delete", "chat.delete", "premium-chat", "standard-chat", "limit-user"}
)
"""Every kind a plan of at least `MIN_TURNS_FOR_COVERAGE` turns contains."""

MIN_TURNS_FOR_COVERAGE: Final = len(REQUIRED_OUTCOMES)

# Weights of the outcomes of turns beyond the required ones: mostly healthy traffic.
RANDOM_OUTCOMES: Final[tuple[tuple[Outcome, int], ...]] = (
    (Outcome("completed", "inline"), 40),
    (Outcome("completed", "after"), 16),
    (Outcome("completed", "before"), 8),
    (Outcome("completed", "none"), 3),
    (Outcome("completed", "late"), 2),
    (Outcome("cancelled", "inline", partial_text=True), 3),
    (Outcome("cancelled", "after", partial_text=True), 2),
    (Outcome("cancelled", "none", partial_text=False), 2),
    *((Outcome("failed", mode, code), 1) for code in sorted(USAGE_CODES) for mode in ("inline", "after")),
    *((Outcome("failed", "none", code), 1) for code in sorted(RELEASED_CODES)),
    (Outcome("failed", "none", UNKNOWN_ERROR_CODE), 1),
)
EXTRA_FLAG_RATE: Final = 0.04
MUTATION_RATE: Final = 0.08
CHAT_DELETE_RATE: Final = 0.1
PREMIUM_CHAT_RATE: Final = 0.35

OVERSHOOT_INPUT_TOKENS: Final = 150_000

LIMIT_TURNS: Final = 8
"""The limit user asks at most this often per chat; with the demo policy the 4th request is refused."""
LIMIT_CHATS: Final = 3
"""The limit user's chats, played at once: a burst of one user's requests near a limit, on
several partitions (check and reserve must stay atomic per user)."""
LIMIT_CONTENT: Final = (
    "Summarise the attached quarterly report, list every risk it names with its owner, "
    "compare the numbers with last quarter, and draft a one page memo for the board that "
    "explains the three largest changes in plain words. Keep the tone neutral and precise."
)
LIMIT_INPUT_TOKENS: Final = 12_000
LIMIT_OUTPUT_TOKENS: Final = 24_000
"""A heavy user: long context, long answers (the output is capped by the model's max output)."""

VOCABULARY: Final = (
    "the quarterly report shows revenue growth across regions while costs rose in logistics and "
    "support please explain why margins changed and what the team should do next write a short "
    "summary with numbers compare it with the plan list risks owners and dates draft an email to "
    "finance about the budget review translate the paragraph into french fix this python function "
    "that parses dates in utc and add tests for leap years what is the difference between a mutex "
    "and a semaphore give an example in rust suggest three titles for a blog post about stream "
    "processing with kafka and postgres"
)
WORDS: Final = tuple(VOCABULARY.split())
