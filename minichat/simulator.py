"""`minichat simulate`: a gateway simulator that plays realistic traffic through the real stack.

Two halves:

- `make_plan(...)` is pure and deterministic for a seed: tenants, users, chats and, per chat, the
  steps a gateway will play (turn requests, the provider's answer and usage, retries, edits,
  deletes, duplicates, out-of-order and early events). It covers every scenario kind of
  `SCENARIO_KINDS` once the plan has at least `MIN_TURNS_FOR_COVERAGE` turns, plus one user of the
  demo tenant (limits from `demo_policy.yaml`) who keeps asking until quota runs out.
- `run_simulation(settings, options)` plays the plan: each chat is an asyncio task (bounded), which
  sends a command on `turn-requests`, waits for its `turn.decision` (read from `turn-decisions`,
  matched on `command_event_id`), and for an accepted turn plays the provider side on
  `provider-responses` and `usage`, and sends the chat's next command as soon as the broker
  acknowledged the turn's terminal event (a real gateway's pace: the processor applies a chat's
  facts before its later commands however far behind it is; `wait_for_terminal` waits, polling the
  database, until the processor applied the terminal event instead). Then it waits until the
  processor is quiescent. Ids are fresh per run (a rerun never collides); choices come from the seed.

Message content is generated text; it is produced to Kafka and never logged or printed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TextIO
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ValidationError

from minichat.client import FACT_TYPES, Command, DecisionTimeout, GatewayClient, decision_json
from minichat.domain.settlement import RELEASED_CODES, USAGE_CODES
from minichat.models import events
from minichat.models.policy import CatalogModel, Policy, load_policy
from minichat.models.topics import PROVIDER_RESPONSES, TURN_REQUESTS, USAGE, TopicNames
from minichat.settings import Settings
from minichat.summary import (
    OK_LINE,
    Backlog,
    Summary,
    render,
    summarize,
    wait_quiescent,
)
from minichat.tasks import cancel_and_wait

DEMO_POLICY: Final = Path(__file__).with_name("demo_policy.yaml")
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
_RANDOM_OUTCOMES: Final[tuple[tuple[Outcome, int], ...]] = (
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
_EXTRA_FLAG_RATE: Final = 0.04
_MUTATION_RATE: Final = 0.08
_CHAT_DELETE_RATE: Final = 0.1
_PREMIUM_CHAT_RATE: Final = 0.35

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

_VOCABULARY: Final = (
    "the quarterly report shows revenue growth across regions while costs rose in logistics and "
    "support please explain why margins changed and what the team should do next write a short "
    "summary with numbers compare it with the plan list risks owners and dates draft an email to "
    "finance about the budget review translate the paragraph into french fix this python function "
    "that parses dates in utc and add tests for leap years what is the difference between a mutex "
    "and a semaphore give an example in rust suggest three titles for a blog post about stream "
    "processing with kafka and postgres"
)
_WORDS: Final = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class TokenPlan:
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_calls: int = 0
    code_interpreter_calls: int = 0


@dataclass(frozen=True)
class TurnStep:
    """A command that creates a turn, and how the provider side of that turn plays out."""

    command: TurnCommand
    content: str
    """User text (requested and edit); empty for retry."""
    outcome: Outcome
    tokens: TokenPlan
    progress: int
    reply_words: int
    web_search: bool = False
    code_interpreter: bool = False
    image_count: int = 0
    flags: frozenset[Flag] = frozenset()
    think_ms: int = 50
    """The user's pause before this step."""


@dataclass(frozen=True)
class DeleteStep:
    """`turn.delete` of the chat's latest turn."""


Step = TurnStep | DeleteStep


@dataclass(frozen=True)
class ChatPlan:
    tenant: int
    """Index into the run's tenants; `Plan.demo_tenant` is the demo tenant."""
    user: int
    chat: int
    model: str
    tier: str
    title: str | None
    steps: tuple[Step, ...]
    delete_chat: bool = False
    limit: bool = False
    """The limit user's chat: it stops at the first `quota_exceeded`."""


@dataclass(frozen=True)
class Plan:
    seed: int
    tenants: int
    users_per_tenant: int
    chats_per_user: int
    turns_per_chat: int
    chats: tuple[ChatPlan, ...]

    @property
    def demo_tenant(self) -> int:
        return self.tenants

    @property
    def steps(self) -> int:
        return sum(len(c.steps) + int(c.delete_chat) for c in self.chats)

    def scenario_counts(self) -> Counter[str]:
        """How often each scenario kind occurs (a turn counts under its outcome and each flag)."""
        counts: Counter[str] = Counter()
        for chat in self.chats:
            if chat.limit:
                counts["limit-user"] += 1
                continue
            counts[f"{chat.tier}-chat"] += 1
            counts["chat.delete"] += int(chat.delete_chat)
            for step in chat.steps:
                if isinstance(step, DeleteStep):
                    counts["turn.delete"] += 1
                    continue
                if step.command != "turn.requested":
                    counts[step.command] += 1
                counts[step.outcome.label] += 1
                counts.update(step.flags)
        return counts


def _weighted(rng: random.Random, table: Sequence[tuple[Outcome, int]]) -> Outcome:
    return rng.choices([o for o, _ in table], weights=[w for _, w in table])[0]


def _text(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "?"


def _tokens(rng: random.Random, outcome: Outcome, model: CatalogModel, flags: frozenset[Flag]) -> TokenPlan:
    """Realistic usage: hundreds to thousands of tokens, output within the model's maximum. An
    overshoot is a long context the estimate could not see: far above any reserve (x1.1)."""
    if outcome.terminal == "failed" and outcome.error_code in RELEASED_CODES:
        return TokenPlan(0, 0)
    if "overshoot" in flags:
        input_tokens = min(OVERSHOOT_INPUT_TOKENS, model.max_input_tokens)
    else:
        input_tokens = rng.randint(300, 6000)
    output_tokens = rng.randint(40, min(2500, model.max_output_tokens))
    if outcome.terminal != "completed":
        output_tokens = rng.randint(0, output_tokens // 2)  # cut short
    web = 0
    code = 0
    if outcome.error_code == "web_search_calls_exceeded":
        web = 3
    elif outcome.error_code == "code_interpreter_calls_exceeded":
        code = 11
    return TokenPlan(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=rng.randint(0, input_tokens // 2) if rng.random() < 0.4 else 0,
        reasoning_tokens=rng.randint(0, output_tokens // 2) if model.tier == "premium" else 0,
        web_search_calls=web,
        code_interpreter_calls=code,
    )


def _turn(
    rng: random.Random,
    policy: Policy,
    command: TurnCommand,
    outcome: Outcome,
    model: CatalogModel,
    flags: frozenset[Flag] = frozenset(),
) -> TurnStep:
    """One turn; it never asks for what the policy switched off (that is refused, not traffic)."""
    switches = policy.kill_switches
    released = outcome.terminal == "failed" and outcome.error_code in RELEASED_CODES
    long_prompt = rng.random() < 0.15
    web = outcome.error_code == "web_search_calls_exceeded" or (model.web_search and rng.random() < 0.1)
    images = 1 if rng.random() < 0.05 else 0
    return TurnStep(
        command=command,
        content="" if command == "turn.retry" else _text(rng, 200, 900) if long_prompt else _text(rng, 5, 60),
        outcome=outcome,
        tokens=_tokens(rng, outcome, model, flags),
        progress=0 if released else rng.randint(1, 4),
        reply_words=rng.randint(20, 300),
        web_search=web and not switches.disable_web_search,
        code_interpreter=outcome.error_code == "code_interpreter_calls_exceeded",
        image_count=0 if switches.disable_images else min(images, policy.max_images),
        flags=flags,
        think_ms=rng.randint(5, 120),
    )


def _eligible(flag: Flag, outcome: Outcome) -> bool:
    if flag == "overshoot":
        return outcome.terminal == "completed" and outcome.usage == "inline"
    if flag == "duplicate-usage":
        return outcome.usage in ("after", "before", "late")
    return True


def make_plan(
    policy: Policy,
    *,
    seed: int,
    tenants: int = 4,
    users_per_tenant: int = 5,
    chats_per_user: int = 3,
    turns_per_chat: int = 4,
) -> Plan:
    """The traffic of one run: deterministic for (policy catalog, seed, sizes)."""
    if min(tenants, users_per_tenant, chats_per_user, turns_per_chat) < 1:
        raise ValueError("tenants, users, chats and turns must each be at least 1")
    rng = random.Random(seed)
    enabled = [m for m in policy.models if m.enabled]
    premium = [m for m in enabled if m.tier == "premium"]
    standard = [m for m in enabled if m.tier == "standard"]
    if not enabled:
        raise ValueError("the policy has no enabled model")

    # Chats: the first is premium and the second standard when the catalog has both.
    skeleton: list[tuple[int, int, int, CatalogModel]] = []
    for t in range(tenants):
        for u in range(users_per_tenant):
            for c in range(chats_per_user):
                n = len(skeleton)
                if premium and (n == 0 or (n > 1 and rng.random() < _PREMIUM_CHAT_RATE) or not standard):
                    model = rng.choice(premium)
                else:
                    model = rng.choice(standard)
                skeleton.append((t, u, c, model))

    # Turn slots, then outcomes: every required outcome once (shuffled over the slots), then random.
    slots = [(i, k) for i in range(len(skeleton)) for k in range(turns_per_chat)]
    order = slots[:]
    rng.shuffle(order)
    outcome: dict[tuple[int, int], Outcome] = {}
    for slot, required in zip(order, REQUIRED_OUTCOMES, strict=False):
        outcome[slot] = required
    for slot in slots:
        if slot not in outcome:
            outcome[slot] = _weighted(rng, _RANDOM_OUTCOMES)

    # Flags: each once on its own eligible slot where possible, then a few at random.
    flags: dict[tuple[int, int], set[Flag]] = {slot: set() for slot in slots}
    used: set[tuple[int, int]] = set()
    for flag in FLAGS:
        candidates = [s for s in order if _eligible(flag, outcome[s])]
        free = [s for s in candidates if s not in used]
        pick = free[0] if free else candidates[0] if candidates else None
        if pick is not None:
            flags[pick].add(flag)
            used.add(pick)
    for slot in slots:
        for flag in FLAGS:
            if rng.random() < _EXTRA_FLAG_RATE and _eligible(flag, outcome[slot]):
                flags[slot].add(flag)

    # Mutations after a turn: one retry, one edit, one delete, then a few at random.
    mutation: dict[tuple[int, int], Mutation] = {}
    for mutation_kind, slot in zip(MUTATIONS, reversed(order), strict=False):
        mutation[slot] = mutation_kind
    for slot in slots:
        if slot not in mutation and rng.random() < _MUTATION_RATE:
            mutation[slot] = rng.choice(MUTATIONS)

    deleted_chats = {rng.randrange(len(skeleton))} | {
        i for i in range(len(skeleton)) if rng.random() < _CHAT_DELETE_RATE
    }

    chats: list[ChatPlan] = []
    for i, (t, u, c, model) in enumerate(skeleton):
        steps: list[Step] = []
        for k in range(turns_per_chat):
            slot = (i, k)
            steps.append(_turn(rng, policy, "turn.requested", outcome[slot], model, frozenset(flags[slot])))
            after = mutation.get(slot)
            if after == "turn.delete":
                steps.append(DeleteStep())
            elif after is not None:
                steps.append(_turn(rng, policy, after, _weighted(rng, _RANDOM_OUTCOMES), model))
        title = _text(rng, 2, 6)[:80] if rng.random() < 0.5 else None
        chats.append(
            ChatPlan(t, u, c, model.id, model.tier, title, tuple(steps), delete_chat=i in deleted_chats)
        )

    chats.extend(_limit_chat(policy, tenants, c) for c in range(LIMIT_CHATS))
    return Plan(seed, tenants, users_per_tenant, chats_per_user, turns_per_chat, tuple(chats))


def limit_model(policy: Policy) -> CatalogModel:
    """The limit user's chat model: the premium default (else any enabled model)."""
    enabled = [m for m in policy.models if m.enabled]
    ranked = sorted(enabled, key=lambda m: (m.tier != "premium", not m.default))
    return ranked[0]


def _limit_chat(policy: Policy, demo_tenant: int, index: int) -> ChatPlan:
    model = limit_model(policy)
    step = TurnStep(
        command="turn.requested",
        content=LIMIT_CONTENT,
        outcome=Outcome("completed", "inline"),
        tokens=TokenPlan(LIMIT_INPUT_TOKENS, LIMIT_OUTPUT_TOKENS),
        progress=1,
        reply_words=200,
        think_ms=10,
    )
    return ChatPlan(
        demo_tenant, 0, index, model.id, model.tier, "Board memo", (step,) * LIMIT_TURNS, limit=True
    )


# --------------------------------------------------------------------------------------------
# Playing a plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulateOptions:
    tenants: int = 4
    users_per_tenant: int = 5
    chats_per_user: int = 3
    turns_per_chat: int = 4
    seed: int | None = None
    """None: a random seed (printed, so the run can be repeated)."""
    timeout: float = 120.0
    """Seconds to wait, after the traffic, for the processor to settle everything."""
    step_timeout: float = 30.0
    """Seconds to wait for one decision, or for one turn to leave `running`."""
    concurrency: int = 32
    """Chats played at the same time."""
    wait_for_terminal: bool = False
    """Send a chat's next command only once the processor applied the previous turn's terminal
    event (a polite gateway), instead of as soon as the broker acknowledged it."""


@dataclass
class SimulationResult:
    plan: Plan
    tenants: tuple[UUID, ...]
    """The run's tenants in plan order; the last one is the demo tenant."""
    stats: Counter[str]
    problems: list[str]
    backlog: Backlog | None
    elapsed_s: float


class SetupError(RuntimeError):
    """The deployment is not there (topics missing, database unreachable): nothing was sent."""


class Progress:
    """A tiny progress bar on a text stream: redrawn in place on a terminal, else a few milestones."""

    def __init__(self, total: int, stream: TextIO, label: str, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.label = label
        self.width = width
        self.done = 0
        self.tty = stream.isatty()
        self._start = time.monotonic()
        self._drawn = 0.0
        self._milestone = 25

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw()

    def line(self) -> str:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._start
        return f"{self.label} [{bar}] {self.done}/{self.total}  {elapsed:.0f}s"

    def _draw(self, force: bool = False) -> None:
        if self.tty:
            now = time.monotonic()
            if force or now - self._drawn >= 0.1 or self.done == self.total:
                self._drawn = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
            return
        percent = 100 * self.done // self.total
        while self._milestone <= 100 and percent >= self._milestone:
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({self._milestone}%)\n")
            self.stream.flush()
            self._milestone += 25

    def finish(self) -> None:
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


WaitKind = Literal["terminal", "settled", "usage", "parked"]

_TURNS_SQL: Final = """
SELECT t.chat_id, t.request_id, t.state, t.settled_at IS NOT NULL AS settled, t.usage_known
FROM chat_turns t
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k(tenant_id, chat_id, request_id)
  ON t.tenant_id = k.tenant_id AND t.chat_id = k.chat_id AND t.request_id = k.request_id
"""
_PARKED_SQL: Final = """
SELECT DISTINCT p.chat_id, p.request_id
FROM parked_events p
JOIN unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS k(tenant_id, chat_id, request_id)
  ON p.tenant_id = k.tenant_id AND p.chat_id = k.chat_id AND p.request_id = k.request_id
"""


class TurnWatcher:
    """One poller for every chat waiting on the database: a turn left `running`, a turn settled,
    or an early event parked. One query per kind per tick, whatever the number of waiters."""

    def __init__(self, pool: asyncpg.Pool, interval: float = 0.05) -> None:
        self._pool = pool
        self._interval = interval
        self._waiting: dict[tuple[WaitKind, UUID, UUID, UUID], asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.errors = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="turn-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def wait(self, kind: WaitKind, tenant: UUID, chat: UUID, request: UUID, *, within: float) -> bool:
        """True once the condition holds, False when it did not within `within` seconds."""
        key = (kind, tenant, chat, request)
        event = self._waiting.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), within)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(key, None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if not self._waiting:
                continue
            try:
                await self._tick()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.errors += 1  # a waiter times out if the database stays away

    async def _tick(self) -> None:
        keys = list(self._waiting)
        turn_keys = [k for k in keys if k[0] != "parked"]
        parked_keys = [k for k in keys if k[0] == "parked"]
        async with self._pool.acquire() as con:
            if turn_keys:
                rows = await con.fetch(_TURNS_SQL, *_columns(turn_keys))
                found = {
                    (r["chat_id"], r["request_id"]): (r["state"], r["settled"], r["usage_known"])
                    for r in rows
                }
                for key in turn_keys:
                    state = found.get((key[2], key[3]))
                    if state is None:
                        continue
                    if (
                        (key[0] == "terminal" and state[0] != "running")
                        or (key[0] == "settled" and state[1])
                        or (key[0] == "usage" and state[2])
                    ):
                        self._set(key)
            if parked_keys:
                rows = await con.fetch(_PARKED_SQL, *_columns(parked_keys))
                parked = {(r["chat_id"], r["request_id"]) for r in rows}
                for key in parked_keys:
                    if (key[2], key[3]) in parked:
                        self._set(key)

    def _set(self, key: tuple[WaitKind, UUID, UUID, UUID]) -> None:
        event = self._waiting.get(key)
        if event is not None:
            event.set()


def _columns(keys: Sequence[tuple[WaitKind, UUID, UUID, UUID]]) -> tuple[list[UUID], list[UUID], list[UUID]]:
    return [k[1] for k in keys], [k[2] for k in keys], [k[3] for k in keys]


def _envelope(tenant: UUID, chat: UUID) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "schema_version": 1,
        "occurred_at": datetime.now(UTC),
        "tenant_id": tenant,
        "chat_id": chat,
    }


@dataclass(frozen=True)
class Record:
    """One record to produce: a topic (without prefix), the encoded event, and what it is; `event`
    is the model itself (the simulator sends it through `minichat.client`, the bench the bytes)."""

    topic: str
    value: bytes
    kind: str
    event: BaseModel | None = field(default=None, compare=False)


def _record(topic: str, event: BaseModel) -> Record:
    return Record(topic, events.to_json_bytes(event), str(getattr(event, "type", "")), event)


@dataclass(frozen=True)
class Script:
    """The provider side of one turn, in sending order; `late` goes out after the turn settled."""

    records: tuple[Record, ...]
    late: tuple[Record, ...] = ()


def provider_script(
    step: TurnStep,
    *,
    tenant: UUID,
    chat: UUID,
    request_id: UUID,
    effective_model: str,
    max_output_tokens: int,
    rng: random.Random,
) -> Script:
    """The events a gateway sends for an accepted turn (duplicates are the same bytes again)."""
    t = step.tokens
    output_tokens = min(t.output_tokens, max_output_tokens)
    usage = events.Usage(
        input_tokens=t.input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=min(t.cache_read_input_tokens, t.input_tokens),
        reasoning_tokens=min(t.reasoning_tokens, output_tokens),
        web_search_calls=t.web_search_calls,
        code_interpreter_calls=t.code_interpreter_calls,
        model=effective_model,
    )
    o = step.outcome
    inline = usage if o.usage == "inline" else None
    words = [rng.choice(_WORDS) for _ in range(step.reply_words)]
    reply = " ".join(words).capitalize() + "."

    def env() -> dict[str, Any]:
        return {**_envelope(tenant, chat), "request_id": request_id}

    terminal: BaseModel
    if o.terminal == "completed":
        terminal = events.TurnCompleted(
            **env(),
            content=reply,
            provider_response_id=f"resp_{uuid.uuid4().hex[:24]}",
            finish_reason="length" if rng.random() < 0.05 else "stop",
            usage=inline,
        )
    elif o.terminal == "failed":
        assert o.error_code is not None
        terminal = events.TurnFailed(
            **env(), error_code=o.error_code, error_detail="simulated provider failure", usage=inline
        )
    else:
        partial = " ".join(words[: max(1, len(words) // 3)]) if o.partial_text else ""
        terminal = events.TurnCancelled(**env(), content=partial, usage=inline)

    usage_report = _record(USAGE, events.UsageReported(**env(), **usage.model_dump()))
    usage_records = [usage_report, usage_report] if "duplicate-usage" in step.flags else [usage_report]

    out: list[Record] = []
    if o.usage == "before":
        out.extend(usage_records)  # out of order: usage first, terminal later
    out.extend(_record(PROVIDER_RESPONSES, events.TurnProgress(**env())) for _ in range(step.progress))
    out.append(_record(PROVIDER_RESPONSES, terminal))
    if "duplicate-terminal" in step.flags:
        out.append(out[-1])
    if "second-terminal" in step.flags:
        second: BaseModel = (
            events.TurnCancelled(**env(), content="")
            if o.terminal != "cancelled"
            else events.TurnFailed(
                **env(), error_code="provider_error", error_detail="simulated late failure"
            )
        )
        out.append(_record(PROVIDER_RESPONSES, second))
    if o.usage == "after":
        out.extend(usage_records)
    late = tuple(usage_records) if o.usage == "late" else ()
    return Script(tuple(out), late)


def turn_command(
    chat: ChatPlan,
    step: TurnStep,
    *,
    tenant: UUID,
    user: UUID,
    chat_id: UUID,
    request_id: UUID,
    latest: UUID | None,
    chat_exists: bool,
) -> events.TurnRequested | events.TurnRetry | events.TurnEdit:
    """The command of a turn step; `request_id` is the new turn's, `latest` the turn a retry or
    edit replaces. `model` (and `title`) go with every request until the chat exists: required
    for a new chat, ignored afterwards."""
    env = _envelope(tenant, chat_id)
    if step.command == "turn.requested":
        return events.TurnRequested(
            **env,
            user_id=user,
            request_id=request_id,
            content=step.content,
            model=None if chat_exists else chat.model,
            title=None if chat_exists else chat.title,
            web_search=step.web_search,
            code_interpreter=step.code_interpreter,
            image_count=step.image_count,
        )
    if latest is None:
        raise ValueError(f"a {step.command} needs the chat's latest turn")
    if step.command == "turn.retry":
        return events.TurnRetry(**env, user_id=user, request_id=latest, new_request_id=request_id)
    return events.TurnEdit(
        **env, user_id=user, request_id=latest, new_request_id=request_id, content=step.content
    )


_STOP: Final = "stop"
_NEXT: Final = "next"


@dataclass
class _ChatState:
    tenant: UUID
    user: UUID
    chat_id: UUID
    rng: random.Random
    created: bool = False
    live: list[UUID] = field(default_factory=list)
    """Request ids of the chat's live accepted turns, oldest first (the last one is the latest)."""


class _Run:
    """One run of a plan against a deployment."""

    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        plan: Plan,
        options: SimulateOptions,
        client: GatewayClient,
        watcher: TurnWatcher,
        progress: Progress,
    ) -> None:
        self.settings = settings
        self.catalog = {m.id: m for m in policy.models}
        self.names = TopicNames(settings.topic_prefix)
        self.plan = plan
        self.options = options
        self.client = client
        self.watcher = watcher
        self.progress = progress
        self.tenants: tuple[UUID, ...] = (*(uuid.uuid4() for _ in range(plan.tenants)), DEMO_TENANT_ID)
        self.users: dict[tuple[int, int], UUID] = {}
        self.stats: Counter[str] = Counter()
        self.problems: list[str] = []
        self.limit_turns_accepted = 0
        self.limit_hit: dict[str, Any] | None = None

    def user(self, tenant: int, user: int) -> UUID:
        return self.users.setdefault((tenant, user), uuid.uuid4())

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)
        self.stats["problems"] += 1

    async def send(self, record: Record, chat: UUID) -> None:
        """A provider or usage fact, through the client (acknowledged by the broker)."""
        fact = record.event
        if not isinstance(fact, FACT_TYPES):
            raise TypeError(f"not a provider or usage fact: {record.kind}")
        await self.client.send_fact(fact)
        self.stats[f"sent {record.topic}"] += 1

    async def pause(self, rng: random.Random, low_ms: int = 5, high_ms: int = 30) -> None:
        await asyncio.sleep(rng.randint(low_ms, high_ms) / 1000)  # a gateway's pacing, not a wait

    async def command(
        self, event: Command, state: _ChatState, *, duplicate: bool = False
    ) -> dict[str, Any] | None:
        """Send a command through the client and return its decision; a duplicate is the same
        command sent again, which must be answered with the stored decision (`replay: true`)."""
        timeout = self.options.step_timeout
        try:
            answer = await self.client.send_command(event, timeout_s=timeout)
        except DecisionTimeout:
            self.problem(f"no decision for a {event.type} within {timeout:.0f}s")
            return None
        self.stats[f"sent {TURN_REQUESTS}"] += 1
        decision = decision_json(answer)
        self.stats[f"decision {decision['decision']}"] += 1
        if duplicate:
            self.stats["duplicate commands"] += 1
            try:
                again = decision_json(await self.client.send_command(event, timeout_s=timeout))
            except DecisionTimeout:
                self.problem(f"no replayed decision for a duplicate {event.type}")
                return decision
            self.stats[f"sent {TURN_REQUESTS}"] += 1
            if not again.get("replay") or {**again, "replay": False} != decision:
                self.problem(
                    f"the decision re-sent for a duplicate {event.type} is not a replay of the first"
                )
            else:
                self.stats["replayed decisions"] += 1
        return decision

    async def play(self, index: int, chat: ChatPlan, slots: asyncio.Semaphore) -> None:
        async with slots:
            total = len(chat.steps) + int(chat.delete_chat)
            done = 0
            state = _ChatState(
                tenant=self.tenants[chat.tenant],
                user=self.user(chat.tenant, chat.user),
                chat_id=uuid.uuid4(),
                rng=random.Random(f"{self.plan.seed}/{index}"),
            )
            try:
                for step in chat.steps:
                    done += 1
                    outcome = await self.step(chat, step, state)
                    self.progress.advance()
                    if outcome == _STOP:
                        break
                if chat.delete_chat and state.created:
                    await asyncio.sleep(0.02)
                    event = events.ChatDelete(**_envelope(state.tenant, state.chat_id), user_id=state.user)
                    decision = await self.command(event, state)
                    if decision is not None and decision["decision"] != "done":
                        self.problem(f"chat.delete refused: {decision.get('error_code')}")
            except Exception as exc:  # one chat's failure is reported, the others play on
                # A validation error quotes its input, which may be message content: name it only.
                detail = "" if isinstance(exc, ValidationError) else f": {exc}"
                self.problem(f"chat {index} stopped: {type(exc).__name__}{detail}")
            finally:
                self.progress.advance(total - done)

    async def step(self, chat: ChatPlan, step: Step, state: _ChatState) -> str:
        if isinstance(step, DeleteStep):
            await self.pause(state.rng, 10, 60)
            if not state.live:
                self.stats["skipped steps"] += 1
                return _NEXT
            delete = events.TurnDelete(
                **_envelope(state.tenant, state.chat_id), user_id=state.user, request_id=state.live[-1]
            )
            decision = await self.command(delete, state)
            if decision is None:
                return _STOP
            if decision["decision"] == "done":
                state.live.pop()
            else:
                self.problem(f"turn.delete refused: {decision.get('error_code')}")
            return _NEXT
        return await self.turn(chat, step, state)

    async def turn(self, chat: ChatPlan, step: TurnStep, state: _ChatState) -> str:
        await asyncio.sleep(step.think_ms / 1000)
        request_id = uuid.uuid4()
        if step.command != "turn.requested" and not state.live:
            self.stats["skipped steps"] += 1
            return _NEXT
        command = turn_command(
            chat,
            step,
            tenant=state.tenant,
            user=state.user,
            chat_id=state.chat_id,
            request_id=request_id,
            latest=state.live[-1] if state.live else None,
            chat_exists=state.created,
        )

        early: Script | None = None
        if "early" in step.flags:
            # The gateway's provider stream races ahead of its own command: the processor parks it.
            model = self.catalog[chat.model]
            early = provider_script(
                step,
                tenant=state.tenant,
                chat=state.chat_id,
                request_id=request_id,
                effective_model=chat.model,
                max_output_tokens=model.max_output_tokens,
                rng=state.rng,
            )
            await self.send(early.records[0], state.chat_id)
            self.stats["early events"] += 1
            parked = await self.watcher.wait(
                "parked", state.tenant, state.chat_id, request_id, within=min(self.options.step_timeout, 10.0)
            )
            self.stats["early events seen parked" if parked else "early events not seen parked"] += 1

        decision = await self.command(command, state, duplicate="duplicate-command" in step.flags)
        if decision is None:
            return _STOP
        if decision["decision"] == "reject":
            code = decision.get("error_code")
            self.stats[f"rejected {code}"] += 1
            if chat.limit:
                self.stats[f"limit user reject {code}"] += 1
                if code == "quota_exceeded":
                    self.limit_hit = decision
                else:
                    self.problem(f"the limit user was refused with {code}, not quota_exceeded")
                return _STOP
            self.problem(f"unexpected reject of a {step.command}: {code}")
            return _NEXT
        state.created = True
        if chat.limit:
            self.limit_turns_accepted += 1
            self.stats[f"limit user {decision['decision']}"] += 1
        if step.command == "turn.requested":
            state.live.append(request_id)
        else:
            state.live[-1] = request_id

        script = early or provider_script(
            step,
            tenant=state.tenant,
            chat=state.chat_id,
            request_id=request_id,
            effective_model=str(decision["effective_model"]),
            max_output_tokens=int(decision["max_output_tokens"]),
            rng=state.rng,
        )
        records = script.records[1:] if early is not None else script.records
        for record in records:
            await self.pause(state.rng)
            await self.send(record, state.chat_id)
        for flag in step.flags - {"early", "duplicate-command"}:
            self.stats[f"played {flag}"] += 1

        timeout = self.options.step_timeout
        polite = self.options.wait_for_terminal
        if polite and not await self.watcher.wait(
            "terminal", state.tenant, state.chat_id, request_id, within=timeout
        ):
            self.problem(f"a turn stayed running {timeout:.0f}s after its terminal event (chat stopped)")
            self.stats["stalled chats"] += 1
            return _STOP
        if script.late:
            # Usage after the processor gave up waiting and settled on an estimate: re-priced.
            settled = await self.watcher.wait(
                "settled", state.tenant, state.chat_id, request_id, within=timeout
            )
            self.stats["late usage after settlement" if settled else "late usage before settlement"] += 1
            for record in script.late:
                await self.send(record, state.chat_id)
        return _NEXT


async def run_simulation(
    settings: Settings, options: SimulateOptions, *, err: TextIO | None = None
) -> SimulationResult:
    """Play a plan against the deployment of `settings`, then wait until it is quiescent."""
    err = err if err is not None else sys.stderr
    policy = load_policy(settings.policy_file)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    plan = make_plan(
        policy,
        seed=seed,
        tenants=options.tenants,
        users_per_tenant=options.users_per_tenant,
        chats_per_user=options.chats_per_user,
        turns_per_chat=options.turns_per_chat,
    )
    regular = sum(len(c.steps) for c in plan.chats if not c.limit)
    err.write(
        f"simulate: seed {seed}; {options.tenants} tenants x {options.users_per_tenant} users x "
        f"{options.chats_per_user} chats x {options.turns_per_chat} turns ({regular} turn steps) "
        f"+ 1 limit user on tenant {DEMO_TENANT_ID}; policy version {policy.version}; "
        f"topics {settings.topic_prefix}*\n"
    )
    if DEMO_TENANT_ID not in policy.tenants:
        err.write(
            f"simulate: note: {settings.policy_file} has no limits for the demo tenant; "
            f"the limit user will not reach a limit (use {DEMO_POLICY.name})\n"
        )
    start = time.monotonic()
    client = GatewayClient(settings.kafka_bootstrap_servers, settings.topic_prefix, linger_ms=2)
    try:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=3)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(f"cannot reach the database: {exc}") from exc
    watcher = TurnWatcher(pool)
    progress = Progress(plan.steps, err, "simulate")
    run: _Run | None = None
    backlog: Backlog | None = None
    try:
        try:
            await client.__aenter__()
        except RuntimeError as exc:  # a topic is missing
            raise SetupError(str(exc)) from exc
        watcher.start()
        run = _Run(settings, policy, plan, options, client, watcher, progress)
        slots = asyncio.Semaphore(max(1, options.concurrency))
        await asyncio.gather(*(run.play(i, chat, slots) for i, chat in enumerate(plan.chats)))
        progress.finish()

        # Settling: a status line redrawn in place on a terminal; one line before and after.
        err.write(f"settling: waiting up to {options.timeout:.0f}s for the processor\n")
        tty = err.isatty()
        settling_since = time.monotonic()

        def show(look: Backlog) -> None:
            if tty:
                waited = time.monotonic() - settling_since
                err.write(f"\rsettling: {look.describe()}  {waited:.0f}s\x1b[K")
                err.flush()

        backlog = await wait_quiescent(settings, run.tenants, within=options.timeout, on_poll=show)
        if tty:
            err.write("\r\x1b[K")
        err.write(f"settling: {'done' if backlog.quiescent else 'gave up'}: {backlog.describe()}\n")
    finally:
        await watcher.stop()
        await client.__aexit__(None, None, None)
        await pool.close()

    assert run is not None
    if not backlog.quiescent:
        run.problem(f"not quiescent after {options.timeout:.0f}s: {backlog.describe()}")
    if DEMO_TENANT_ID in policy.tenants and run.limit_hit is None:
        run.problem(
            f"the limit user was never refused quota_exceeded ({run.limit_turns_accepted} turns accepted)"
        )
    if watcher.errors:
        run.stats["database poll errors"] += watcher.errors
    return SimulationResult(plan, run.tenants, run.stats, run.problems, backlog, time.monotonic() - start)


def render_traffic(result: SimulationResult) -> str:
    """What the simulator sent and saw, as a plain table (counts only, never content)."""
    from minichat.summary import format_table

    rows: list[list[object]] = [[name, n] for name, n in sorted(result.stats.items())]
    rows.append(["elapsed seconds", int(result.elapsed_s)])
    return "traffic\n" + format_table(["what", "count"], rows)


async def simulate(
    settings: Settings, options: SimulateOptions, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`minichat simulate`: play, wait, summarize, print. 0 when every invariant holds, else 1."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        result = await run_simulation(settings, options, err=err)
    except SetupError as exc:
        err.write(f"minichat simulate: {exc}\n")
        return 2
    summary: Summary = await summarize(settings, tenants=result.tenants)
    out.write(render_traffic(result) + "\n\n")
    out.write(render(summary, verdict=False) + "\n\n")
    failures = [*summary.failures, *(f"simulation: {p}" for p in result.problems)]
    out.write("\n".join([f"FAILED: {f}" for f in failures] or [OK_LINE]) + "\n")
    out.flush()
    return 1 if failures else 0
