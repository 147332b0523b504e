"""What every fault run on the three-broker cluster must show at its end (tests/integration/
test_clock_skew.py, test_policy_change.py): quiescent, the books balanced, every command answered
once (re-sends identical), every accepted turn settled once, the workers stopping cleanly, and a
rebuild into an empty database with the live digest."""

from __future__ import annotations

import dataclasses

from minichat.models.topics import INPUT_TOPICS, TopicNames
from minichat.settings import Settings
from minichat.tools.rebuild import run_rebuild
from minichat.tools.summary import render, summarize, wait_quiescent
from tests.integration.test_crash import (
    Fleet,
    check_decisions,
    compare,
    lost_and_duplicated,
)
from tests.support import db_digest, end_offsets


@dataclasses.dataclass
class Verdict:
    failures: list[str]
    commands: int
    decisions: int
    resent: int
    settled_turns: int
    input_events: int
    lost: int
    duplicated: int
    digest_equal: bool
    books: str
    logs: str

    def line(self) -> str:
        return (
            f"{self.input_events} input events, {self.commands} commands, {self.decisions} decisions "
            f"({self.resent} re-sent), {self.settled_turns} turns settled once; lost {self.lost}, "
            f"duplicated {self.duplicated}; digest(live) {'==' if self.digest_equal else '!='} "
            "digest(rebuild)"
        )


async def verify(settings: Settings, fleet: Fleet, rebuilt_url: str) -> Verdict:
    """Check the run (stopping the fleet gracefully), rebuild into `rebuilt_url`, compare."""
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    names = TopicNames(settings.topic_prefix)
    backlog = await wait_quiescent(settings, None, within=120)
    check(backlog.quiescent, f"not quiescent: {backlog.describe()}")
    summary = await summarize(settings)
    failures.extend(f"books: {f}" for f in summary.failures)
    check(summary.accepted_turns == summary.stored_turns == summary.settled_turns > 0, "turns")
    check(summary.reserved_credits_micro == 0, "reserves held")
    check(summary.settled_events == summary.settled_turns, "usage.settled != settled turns")
    check(summary.dead_letters == 0, f"{summary.dead_letters} dead letter(s)")
    decisions = await check_decisions(settings)
    check(decisions.unanswered == [], f"commands without a decision: {decisions.unanswered[:10]}")
    check(decisions.unknown == 0, f"{decisions.unknown} decision(s) of no command")
    check(decisions.differing == [], f"commands answered differently: {decisions.differing[:10]}")
    statuses = fleet.stop()
    check(all(s == 0 for s in statuses), f"exit status on SIGTERM: {statuses}")
    logs = fleet.tails()

    live_digest = await db_digest(settings.database_url)
    rebuild = await run_rebuild(
        settings.model_copy(update={"database_url": rebuilt_url}), show_progress=False
    )
    rebuilt_digest = await db_digest(rebuilt_url)
    if rebuilt_digest != live_digest:
        comparison = await compare(settings.database_url, rebuilt_url, live_digest, rebuilt_digest)
        failures.append(
            f"digest: rebuilt differs from live {comparison.counts}\n" + "\n".join(comparison.lines)
        )
    check(rebuild.dead_lettered == 0 and rebuild.parked_at_end == 0, f"rebuild: {rebuild}")
    inputs = await end_offsets(settings, [names.full(t) for t in INPUT_TOPICS])
    check(rebuild.read == sum(inputs.values()), "the rebuild did not read the whole log")
    lost, duplicated = lost_and_duplicated(summary, decisions)
    check((lost, duplicated) == (0, 0), f"lost {lost}, duplicated {duplicated}")
    return Verdict(
        failures,
        decisions.commands,
        decisions.decisions,
        decisions.resent,
        summary.settled_turns,
        sum(inputs.values()),
        lost,
        duplicated,
        rebuilt_digest == live_digest,
        render(summary),
        logs,
    )
