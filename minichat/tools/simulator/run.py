"""`minichat simulate` end to end: draw the plan, play it, wait until the processor settled
everything, then summarize the books and print them with what the simulator saw."""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO
from uuid import UUID

import asyncpg

from minichat.client import GatewayClient, MissingTopicError
from minichat.kafka_security import gateway_security_arguments
from minichat.models.policy import Policy, load_policy
from minichat.settings import Settings
from minichat.tools.progress import Progress
from minichat.tools.simulator.options import SimulateOptions
from minichat.tools.simulator.plan import Plan, make_plan
from minichat.tools.simulator.play import PlanRun
from minichat.tools.simulator.scenarios import DEMO_POLICY, DEMO_TENANT_ID
from minichat.tools.simulator.watch import TurnWatcher
from minichat.tools.summary import OK_LINE, Backlog, Summary, render, summarize, wait_quiescent
from minichat.tools.tables import format_table


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
    """The deployment is not there (topics missing): nothing was sent."""


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
    start = time.monotonic()
    client = GatewayClient(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        linger_ms=2,
        **gateway_security_arguments(settings),
    )
    # A database or broker it cannot reach propagates to the CLI's boundary, which names the setting.
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=3)
    watcher = TurnWatcher(pool)
    try:
        try:
            await client.__aenter__()
        except MissingTopicError as exc:
            raise SetupError(str(exc)) from exc
        _announce(err, settings, options, policy, plan)  # once both dependencies answered
        watcher.start()
        run = PlanRun(policy, plan, options, client, watcher, Progress(plan.steps, err, "simulate"))
        await run.play_all(options.concurrency)
        backlog = await _settle(settings, run.tenants, options.timeout, err)
    finally:
        await watcher.stop()
        await client.__aexit__(None, None, None)
        await pool.close()
    _final_checks(run, policy, backlog, options.timeout, watcher.errors)
    return SimulationResult(plan, run.tenants, run.stats, run.problems, backlog, time.monotonic() - start)


def _announce(err: TextIO, settings: Settings, options: SimulateOptions, policy: Policy, plan: Plan) -> None:
    """The run's first line: its seed (to repeat it), its size, where it plays."""
    regular = sum(len(c.steps) for c in plan.chats if not c.limit)
    err.write(
        f"simulate: seed {plan.seed}; {options.tenants} tenants x {options.users_per_tenant} users x "
        f"{options.chats_per_user} chats x {options.turns_per_chat} turns ({regular} turn steps) "
        f"+ 1 limit user on tenant {DEMO_TENANT_ID}; policy version {policy.version}; "
        f"topics {settings.topic_prefix}*\n"
    )
    if DEMO_TENANT_ID not in policy.tenants:
        err.write(
            f"simulate: note: {settings.policy_file} has no limits for the demo tenant; "
            f"the limit user will not reach a limit (use {DEMO_POLICY.name})\n"
        )


async def _settle(settings: Settings, tenants: tuple[UUID, ...], within: float, err: TextIO) -> Backlog:
    """Wait until the processor is quiescent: a status line redrawn in place on a terminal; one line
    before and after."""
    err.write(f"settling: waiting up to {within:.0f}s for the processor\n")
    tty = err.isatty()
    settling_since = time.monotonic()

    def show(look: Backlog) -> None:
        if tty:
            waited = time.monotonic() - settling_since
            err.write(f"\rsettling: {look.describe()}  {waited:.0f}s\x1b[K")
            err.flush()

    backlog = await wait_quiescent(settings, tenants, within=within, on_poll=show)
    if tty:
        err.write("\r\x1b[K")
    err.write(f"settling: {'done' if backlog.quiescent else 'gave up'}: {backlog.describe()}\n")
    return backlog


def _final_checks(run: PlanRun, policy: Policy, backlog: Backlog, timeout: float, poll_errors: int) -> None:
    """What only the end of a run can tell: the processor settled, the limit user hit its limit."""
    if not backlog.quiescent:
        run.problem(f"not quiescent after {timeout:.0f}s: {backlog.describe()}")
    if DEMO_TENANT_ID in policy.tenants and run.limit_hit is None:
        run.problem(
            f"the limit user was never refused quota_exceeded ({run.limit_turns_accepted} turns accepted)"
        )
    if poll_errors:
        run.stats["database poll errors"] += poll_errors


def render_traffic(result: SimulationResult) -> str:
    """What the simulator sent and saw, as a plain table (counts only, never content)."""
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
    summary: Summary = await summarize(settings, tenants=result.tenants, spend_tenant=DEMO_TENANT_ID)
    out.write(render_traffic(result) + "\n\n")
    out.write(render(summary, verdict=False) + "\n\n")
    failures = [*summary.failures, *(f"simulation: {p}" for p in result.problems)]
    out.write("\n".join([f"FAILED: {f}" for f in failures] or [OK_LINE]) + "\n")
    out.flush()
    return 1 if failures else 0
