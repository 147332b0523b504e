"""A run's traffic as data (pure, deterministic for a seed): tenants, users, chats and, per chat,
the steps a gateway will play. It covers every kind of `SCENARIO_KINDS` once the plan has at least
`MIN_TURNS_FOR_COVERAGE` turns, plus the demo tenant's limit user, who asks until quota runs out."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from minichat.domain.settlement import RELEASED_CODES
from minichat.models.policy import CatalogModel, Policy
from minichat.tools.simulator.scenarios import (
    CHAT_DELETE_RATE,
    EXTRA_FLAG_RATE,
    FLAGS,
    LIMIT_CHATS,
    LIMIT_CONTENT,
    LIMIT_INPUT_TOKENS,
    LIMIT_OUTPUT_TOKENS,
    LIMIT_TURNS,
    MUTATION_RATE,
    MUTATIONS,
    OVERSHOOT_INPUT_TOKENS,
    PREMIUM_CHAT_RATE,
    RANDOM_OUTCOMES,
    REQUIRED_OUTCOMES,
    WORDS,
    Flag,
    Mutation,
    Outcome,
    TurnCommand,
)


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
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
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


Slot = tuple[int, int]
"""(chat index, turn index within the chat)"""


def make_plan(
    policy: Policy,
    *,
    seed: int,
    tenants: int = 4,
    users_per_tenant: int = 5,
    chats_per_user: int = 3,
    turns_per_chat: int = 4,
) -> Plan:
    """The traffic of one run: deterministic for (policy catalog, seed, sizes). The steps below draw
    from one random stream in this order; reordering them changes every plan of a seed."""
    if min(tenants, users_per_tenant, chats_per_user, turns_per_chat) < 1:
        raise ValueError("tenants, users, chats and turns must each be at least 1")
    if not any(m.enabled for m in policy.models):
        raise ValueError("the policy has no enabled model")
    rng = random.Random(seed)
    skeleton = _skeleton(rng, policy, tenants, users_per_tenant, chats_per_user)
    slots = [(i, k) for i in range(len(skeleton)) for k in range(turns_per_chat)]
    order = slots[:]
    rng.shuffle(order)
    outcomes = _outcomes(rng, slots, order)
    flags = _flags(rng, slots, order, outcomes)
    mutations = _mutations(rng, slots, order)
    deleted_chats = {rng.randrange(len(skeleton))} | {
        i for i in range(len(skeleton)) if rng.random() < CHAT_DELETE_RATE
    }
    chats = [
        _chat_plan(rng, policy, i, chat, turns_per_chat, outcomes, flags, mutations, i in deleted_chats)
        for i, chat in enumerate(skeleton)
    ]
    chats.extend(_limit_chat(policy, tenants, c) for c in range(LIMIT_CHATS))
    return Plan(seed, tenants, users_per_tenant, chats_per_user, turns_per_chat, tuple(chats))


def _skeleton(
    rng: random.Random, policy: Policy, tenants: int, users_per_tenant: int, chats_per_user: int
) -> list[tuple[int, int, int, CatalogModel]]:
    """(tenant, user, chat, model) of every chat: the first is premium and the second standard when
    the catalog has both."""
    enabled = [m for m in policy.models if m.enabled]
    premium = [m for m in enabled if m.tier == "premium"]
    standard = [m for m in enabled if m.tier == "standard"]
    skeleton: list[tuple[int, int, int, CatalogModel]] = []
    for t in range(tenants):
        for u in range(users_per_tenant):
            for c in range(chats_per_user):
                n = len(skeleton)
                if premium and (n == 0 or (n > 1 and rng.random() < PREMIUM_CHAT_RATE) or not standard):
                    model = rng.choice(premium)
                else:
                    model = rng.choice(standard)
                skeleton.append((t, u, c, model))
    return skeleton


def _outcomes(rng: random.Random, slots: list[Slot], order: list[Slot]) -> dict[Slot, Outcome]:
    """Every required outcome once (on the shuffled slots), then random ones."""
    outcome: dict[Slot, Outcome] = {}
    for slot, required in zip(order, REQUIRED_OUTCOMES, strict=False):
        outcome[slot] = required
    for slot in slots:
        if slot not in outcome:
            outcome[slot] = _weighted(rng, RANDOM_OUTCOMES)
    return outcome


def _flags(
    rng: random.Random, slots: list[Slot], order: list[Slot], outcome: dict[Slot, Outcome]
) -> dict[Slot, set[Flag]]:
    """Each flag once on its own eligible slot where possible, then a few at random."""
    flags: dict[Slot, set[Flag]] = {slot: set() for slot in slots}
    used: set[Slot] = set()
    for flag in FLAGS:
        candidates = [s for s in order if _eligible(flag, outcome[s])]
        free = [s for s in candidates if s not in used]
        pick = free[0] if free else candidates[0] if candidates else None
        if pick is not None:
            flags[pick].add(flag)
            used.add(pick)
    for slot in slots:
        for flag in FLAGS:
            if rng.random() < EXTRA_FLAG_RATE and _eligible(flag, outcome[slot]):
                flags[slot].add(flag)
    return flags


def _mutations(rng: random.Random, slots: list[Slot], order: list[Slot]) -> dict[Slot, Mutation]:
    """What follows a turn: one retry, one edit, one delete, then a few at random."""
    mutation: dict[Slot, Mutation] = {}
    for mutation_kind, slot in zip(MUTATIONS, reversed(order), strict=False):
        mutation[slot] = mutation_kind
    for slot in slots:
        if slot not in mutation and rng.random() < MUTATION_RATE:
            mutation[slot] = rng.choice(MUTATIONS)
    return mutation


def _chat_plan(
    rng: random.Random,
    policy: Policy,
    index: int,
    chat: tuple[int, int, int, CatalogModel],
    turns_per_chat: int,
    outcomes: dict[Slot, Outcome],
    flags: dict[Slot, set[Flag]],
    mutations: dict[Slot, Mutation],
    deleted: bool,
) -> ChatPlan:
    t, u, c, model = chat
    steps: list[Step] = []
    for k in range(turns_per_chat):
        slot = (index, k)
        steps.append(_turn(rng, policy, "turn.requested", outcomes[slot], model, frozenset(flags[slot])))
        after = mutations.get(slot)
        if after == "turn.delete":
            steps.append(DeleteStep())
        elif after is not None:
            steps.append(_turn(rng, policy, after, _weighted(rng, RANDOM_OUTCOMES), model))
    title = _text(rng, 2, 6)[:80] if rng.random() < 0.5 else None
    return ChatPlan(t, u, c, model.id, model.tier, title, tuple(steps), delete_chat=deleted)


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
