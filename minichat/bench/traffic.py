"""Pure planning of bench traffic: who talks (tenants, users, chats) and the events of one turn.

A bench turn is what a healthy gateway sends: `turn.requested`, then `progress` x `turn.progress`,
`turn.completed` without inline usage, and `usage.reported`. The events are the contract's
pydantic models, built by the simulator's own helpers (`turn_command`, `provider_script`).
Message content is generated filler; it is produced to Kafka, never logged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from minichat.bench.options import TENANTS, TURNS_PER_CHAT, TURNS_PER_USER
from minichat.models.events import to_json_bytes
from minichat.models.policy import CatalogModel, Policy
from minichat.models.topics import TURN_REQUESTS
from minichat.tools.simulator import (
    ChatPlan,
    Outcome,
    Record,
    TokenPlan,
    TurnStep,
    provider_script,
    turn_command,
)

COMPLETED_THEN_USAGE: Final = Outcome("completed", "after")
"""The terminal event carries no usage; a `usage.reported` follows it."""

_VOCABULARY: Final = (
    "please summarise the report and list the risks with owners dates and numbers compare the "
    "quarter with the plan explain why margins moved draft a short memo for finance translate "
    "this paragraph fix the python function add tests for leap years and time zones"
)
_WORDS: Final = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class Chat:
    index: int
    tenant: UUID
    user: UUID
    chat_id: UUID
    plan: ChatPlan
    """The simulator's view of the chat (its model and title), for `turn_command`."""


@dataclass(frozen=True)
class Population:
    tenants: tuple[UUID, ...]
    users: tuple[tuple[UUID, UUID], ...]
    """(tenant, user) pairs."""
    chats: tuple[Chat, ...]


@dataclass(frozen=True)
class Turn:
    request: Record
    event_id: UUID
    """The command's `event_id`: its `turn.decision` names it as `command_event_id`."""
    request_id: UUID
    facts: tuple[Record, ...]
    """Provider and usage events, in sending order (topics without the prefix)."""


def sizes(turns: int) -> tuple[int, int]:
    """(chats, users) for a backlog of `turns`: about turns/4 chats and turns/40 users."""
    chats = max(1, round(turns / TURNS_PER_CHAT))
    users = max(1, min(chats, round(turns / TURNS_PER_USER)))
    return chats, users


def bench_model(policy: Policy) -> CatalogModel:
    """The standard tier's default model (else the first enabled one): one `total` bucket per turn."""
    enabled = [m for m in policy.models if m.enabled]
    if not enabled:
        raise ValueError("the policy has no enabled model")
    ranked = sorted(enabled, key=lambda m: (m.tier != "standard", not m.default))
    return ranked[0]


def uuid_from(rng: random.Random) -> UUID:
    return UUID(int=rng.getrandbits(128), version=4)


def population(chats: int, users: int, model: CatalogModel, seed: int, tenants: int = TENANTS) -> Population:
    """`chats` chats of `users` users (round robin) of `tenants` tenants; deterministic for a seed."""
    rng = random.Random(f"population/{seed}")
    tenant_ids = tuple(uuid_from(rng) for _ in range(tenants))
    user_ids = tuple((tenant_ids[u % tenants], uuid_from(rng)) for u in range(users))
    made = []
    for i in range(chats):
        tenant, user = user_ids[i % users]
        plan = ChatPlan(
            tenant=(i % users) % tenants,
            user=i % users,
            chat=i,
            model=model.id,
            tier=model.tier,
            title=f"bench chat {i}",
            steps=(),
        )
        made.append(Chat(i, tenant, user, uuid_from(rng), plan))
    return Population(tenant_ids, user_ids, tuple(made))


def turns_per_chat(turns: int, chats: int) -> list[int]:
    """`turns` spread over `chats` as evenly as possible (the first ones get one more)."""
    base, extra = divmod(turns, chats)
    return [base + 1 if i < extra else base for i in range(chats)]


def _content(rng: random.Random) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(5, 60))).capitalize() + "?"


def make_turn(chat: Chat, number: int, model: CatalogModel, *, progress: int, seed: int) -> Turn:
    """The `number`-th turn of `chat` (0 creates the chat: it carries the model and title)."""
    rng = random.Random(f"turn/{seed}/{chat.index}/{number}")
    step = TurnStep(
        command="turn.requested",
        content=_content(rng),
        outcome=COMPLETED_THEN_USAGE,
        tokens=TokenPlan(rng.randint(300, 6000), rng.randint(40, min(2500, model.max_output_tokens))),
        progress=progress,
        reply_words=rng.randint(20, 60),
    )
    request_id = uuid_from(rng)
    command = turn_command(
        chat.plan,
        step,
        tenant=chat.tenant,
        user=chat.user,
        chat_id=chat.chat_id,
        request_id=request_id,
        latest=None,
        chat_exists=number > 0,
    )
    script = provider_script(
        step,
        tenant=chat.tenant,
        chat=chat.chat_id,
        request_id=request_id,
        effective_model=model.id,
        max_output_tokens=model.max_output_tokens,
        rng=rng,
    )
    request = Record(TURN_REQUESTS, to_json_bytes(command), command.type)
    return Turn(request, command.event_id, request_id, script.records)
