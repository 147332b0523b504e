"""What a gateway sends for one step of a plan, as records (pure but for fresh ids and the clock):
the command of a turn step, and the provider side of an accepted turn. The bench builds its
traffic from the same functions."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from minichat.client import envelope
from minichat.models import events
from minichat.models.topics import PROVIDER_RESPONSES, USAGE
from minichat.tools.simulator.plan import ChatPlan, TurnStep
from minichat.tools.simulator.scenarios import WORDS, Outcome


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


Envelope = Callable[[], dict[str, Any]]
"""Fresh envelope fields of one event of the turn (a new event id each call)."""


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

    def env() -> dict[str, Any]:
        return {**envelope(tenant, chat), "request_id": request_id}

    usage = _usage(step, effective_model, max_output_tokens)
    words = [rng.choice(WORDS) for _ in range(step.reply_words)]
    terminal = _terminal(step.outcome, env, words, usage if step.outcome.usage == "inline" else None, rng)
    usage_report = _record(USAGE, events.UsageReported(**env(), **usage.model_dump()))
    usage_records = [usage_report, usage_report] if "duplicate-usage" in step.flags else [usage_report]

    out: list[Record] = []
    if step.outcome.usage == "before":
        out.extend(usage_records)  # out of order: usage first, terminal later
    out.extend(_record(PROVIDER_RESPONSES, events.TurnProgress(**env())) for _ in range(step.progress))
    out.append(_record(PROVIDER_RESPONSES, terminal))
    if "duplicate-terminal" in step.flags:
        out.append(out[-1])
    if "second-terminal" in step.flags:
        out.append(_record(PROVIDER_RESPONSES, _second_terminal(step.outcome, env)))
    if step.outcome.usage == "after":
        out.extend(usage_records)
    late = tuple(usage_records) if step.outcome.usage == "late" else ()
    return Script(tuple(out), late)


def _usage(step: TurnStep, effective_model: str, max_output_tokens: int) -> events.Usage:
    """The step's planned usage, within what the decision allowed."""
    t = step.tokens
    output_tokens = min(t.output_tokens, max_output_tokens)
    return events.Usage(
        input_tokens=t.input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=min(t.cache_read_input_tokens, t.input_tokens),
        reasoning_tokens=min(t.reasoning_tokens, output_tokens),
        web_search_calls=t.web_search_calls,
        code_interpreter_calls=t.code_interpreter_calls,
        model=effective_model,
    )


def _terminal(
    o: Outcome, env: Envelope, words: list[str], inline: events.Usage | None, rng: random.Random
) -> BaseModel:
    """The turn's terminal event, as the outcome says; `inline` is the usage it carries."""
    if o.terminal == "completed":
        return events.TurnCompleted(
            **env(),
            content=" ".join(words).capitalize() + ".",
            provider_response_id=f"resp_{uuid.uuid4().hex[:24]}",
            finish_reason="length" if rng.random() < 0.05 else "stop",
            usage=inline,
        )
    if o.terminal == "failed":
        assert o.error_code is not None
        return events.TurnFailed(
            **env(), error_code=o.error_code, error_detail="simulated provider failure", usage=inline
        )
    partial = " ".join(words[: max(1, len(words) // 3)]) if o.partial_text else ""
    return events.TurnCancelled(**env(), content=partial, usage=inline)


def _second_terminal(o: Outcome, env: Envelope) -> BaseModel:
    """A terminal event after the first one (the processor keeps the first)."""
    if o.terminal != "cancelled":
        return events.TurnCancelled(**env(), content="")
    return events.TurnFailed(**env(), error_code="provider_error", error_detail="simulated late failure")


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
    env = envelope(tenant, chat_id)
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
