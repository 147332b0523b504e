"""Playing a plan: each chat an asyncio task that sends its commands through `minichat.client`,
waits for each decision, plays the provider side of an accepted turn and keeps count of what it
saw. A chat's next command goes out once the broker acknowledged the turn's terminal event (a real
gateway's pace), or, with `wait_for_terminal`, once the processor applied it."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final
from uuid import UUID

from pydantic import ValidationError

from minichat.client import FACT_TYPES, Command, DecisionTimeout, GatewayClient, decision_json, envelope
from minichat.models import events
from minichat.models.policy import Policy
from minichat.models.topics import TURN_REQUESTS
from minichat.tools.progress import Progress
from minichat.tools.simulator.options import SimulateOptions
from minichat.tools.simulator.plan import ChatPlan, DeleteStep, Plan, Step, TurnStep
from minichat.tools.simulator.scenarios import DEMO_TENANT_ID
from minichat.tools.simulator.script import Record, Script, provider_script, turn_command
from minichat.tools.simulator.watch import TurnWatcher

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


class PlanRun:
    """One run of a plan against a deployment."""

    def __init__(
        self,
        policy: Policy,
        plan: Plan,
        options: SimulateOptions,
        client: GatewayClient,
        watcher: TurnWatcher,
        progress: Progress,
    ) -> None:
        self.catalog = {m.id: m for m in policy.models}
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
        command sent again, which must be answered with the stored decision (`replay: true`). The
        first answer may itself say `replay: true`: a worker that died between committing a
        decision and producing it re-sends it on restart, and that re-send is the first answer."""
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
            if not again.get("replay"):
                self.problem(f"a duplicate {event.type} was decided again (`replay: false`)")
            elif {**again, "replay": False} != {**decision, "replay": False}:
                self.problem(f"the decision re-sent for a duplicate {event.type} differs from the first")
            else:
                self.stats["replayed decisions"] += 1
        return decision

    async def play_all(self, concurrency: int) -> None:
        """Every chat of the plan, `concurrency` at a time."""
        slots = asyncio.Semaphore(max(1, concurrency))
        await asyncio.gather(*(self.play(i, chat, slots) for i, chat in enumerate(self.plan.chats)))
        self.progress.finish()

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
                    event = events.ChatDelete(**envelope(state.tenant, state.chat_id), user_id=state.user)
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
                **envelope(state.tenant, state.chat_id), user_id=state.user, request_id=state.live[-1]
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
        """One turn step: its command (after its early event, if any), then the provider side of
        an accepted turn, then the waits the step asks for."""
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
        early = await self.early(chat, step, state, request_id) if "early" in step.flags else None
        decision = await self.command(command, state, duplicate="duplicate-command" in step.flags)
        if decision is None:
            return _STOP
        if decision["decision"] == "reject":
            return self.rejected(chat, step, decision)
        self.accepted(chat, step, state, request_id, decision)
        script = early or self.script(
            step, state, request_id, str(decision["effective_model"]), int(decision["max_output_tokens"])
        )
        for record in script.records[1:] if early is not None else script.records:
            await self.pause(state.rng)
            await self.send(record, state.chat_id)
        for flag in step.flags - {"early", "duplicate-command"}:
            self.stats[f"played {flag}"] += 1
        return await self.after_terminal(state, request_id, script)

    def script(
        self, step: TurnStep, state: _ChatState, request_id: UUID, model: str, max_output_tokens: int
    ) -> Script:
        return provider_script(
            step,
            tenant=state.tenant,
            chat=state.chat_id,
            request_id=request_id,
            effective_model=model,
            max_output_tokens=max_output_tokens,
            rng=state.rng,
        )

    async def early(self, chat: ChatPlan, step: TurnStep, state: _ChatState, request_id: UUID) -> Script:
        """The gateway's provider stream races ahead of its own command: its first event goes out
        before the command, and the processor must park it."""
        model = self.catalog[chat.model]
        early = self.script(step, state, request_id, chat.model, model.max_output_tokens)
        await self.send(early.records[0], state.chat_id)
        self.stats["early events"] += 1
        parked = await self.watcher.wait(
            "parked", state.tenant, state.chat_id, request_id, within=min(self.options.step_timeout, 10.0)
        )
        self.stats["early events seen parked" if parked else "early events not seen parked"] += 1
        return early

    def rejected(self, chat: ChatPlan, step: TurnStep, decision: dict[str, Any]) -> str:
        """A refused turn: the limit user stops at its expected `quota_exceeded`; anyone else's
        refusal is a problem."""
        code = decision.get("error_code")
        self.stats[f"rejected {code}"] += 1
        if not chat.limit:
            self.problem(f"unexpected reject of a {step.command}: {code}")
            return _NEXT
        self.stats[f"limit user reject {code}"] += 1
        if code == "quota_exceeded":
            self.limit_hit = decision
        else:
            self.problem(f"the limit user was refused with {code}, not quota_exceeded")
        return _STOP

    def accepted(
        self, chat: ChatPlan, step: TurnStep, state: _ChatState, request_id: UUID, decision: dict[str, Any]
    ) -> None:
        """The chat now exists, and the new turn is its latest (a retry or edit replaces one)."""
        state.created = True
        if chat.limit:
            self.limit_turns_accepted += 1
            self.stats[f"limit user {decision['decision']}"] += 1
        if step.command == "turn.requested":
            state.live.append(request_id)
        else:
            state.live[-1] = request_id

    async def after_terminal(self, state: _ChatState, request_id: UUID, script: Script) -> str:
        """A polite gateway waits until the turn left `running`; late usage waits until the turn
        settled on its estimate, then goes out (and is re-priced)."""
        timeout = self.options.step_timeout
        if self.options.wait_for_terminal and not await self.watcher.wait(
            "terminal", state.tenant, state.chat_id, request_id, within=timeout
        ):
            self.problem(f"a turn stayed running {timeout:.0f}s after its terminal event (chat stopped)")
            self.stats["stalled chats"] += 1
            return _STOP
        if script.late:
            settled = await self.watcher.wait(
                "settled", state.tenant, state.chat_id, request_id, within=timeout
            )
            self.stats["late usage after settlement" if settled else "late usage before settlement"] += 1
            for record in script.late:
                await self.send(record, state.chat_id)
        return _NEXT
