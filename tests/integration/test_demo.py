"""The demo end to end: `minichat simulate`'s traffic through a live worker, then the books.

A small plan (2 tenants x 2 users x 2 chats x 3 turns, plus the demo tenant's limit user) still
holds every scenario kind (tests/unit/test_simulator.py checks that), so this one run crosses
admission, parking, every settlement row, the watchdog's usage grace, late-usage adjustment, the
outbox relay, billing de-duplication and budget alerts (the limit user crosses 50 % of the demo
tenant's daily limits, and the summary lists it).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from minichat.tools.simulator import (
    DEMO_POLICY,
    DEMO_TENANT_ID,
    LIMIT_CHATS,
    SimulateOptions,
    render_traffic,
    run_simulation,
)
from minichat.tools.summary import render, summarize
from minichat.tools.summary.render import short_id
from tests.conftest import live_deployment
from tests.support import Endpoints

pytestmark = pytest.mark.integration

OPTIONS = SimulateOptions(
    tenants=2,
    users_per_tenant=2,
    chats_per_user=2,
    turns_per_chat=3,
    seed=20261126,
    timeout=90.0,
    step_timeout=30.0,
)


async def test_simulated_traffic_settles_every_accepted_turn_once(
    endpoints: Endpoints, template_database: str, tmp_path: Path
) -> None:
    async with live_deployment(endpoints, template_database, tmp_path, policy=DEMO_POLICY) as live:
        progress = io.StringIO()
        result = await run_simulation(live.settings, OPTIONS, err=progress)
        summary = await summarize(live.settings, tenants=result.tenants)
        report = "\n\n".join([progress.getvalue(), render_traffic(result), render(summary), *result.problems])

        # The simulator's own checks: every command answered, every turn left running, the
        # duplicate replayed, the limit user refused, and the processor quiescent in time.
        assert result.problems == [], report
        assert summary.failures == (), report

        # Every accepted turn is stored and settled, once.
        assert summary.accepted_turns == summary.stored_turns == summary.settled_turns > 0, report
        assert summary.reserved_credits_micro == 0, report
        # Billing, after de-duplication on dedupe_key, has exactly one event per settled turn.
        assert summary.settled_events == summary.settled_turns, report
        assert (summary.missing_billing, summary.unexpected_billing) == (0, 0), report
        assert summary.billing_records >= summary.settled_events + summary.adjusted_events, report
        assert all(c.billed_micro == c.charged_micro for c in summary.credits), report
        assert summary.quota_mismatches == (), report
        # Late usage re-priced an estimated settlement, and billing heard of it once per turn.
        assert result.stats["late usage after settlement"] >= 1, report
        assert summary.adjusted_events == summary.adjusted_turns >= 1, report
        assert (summary.unpublished_outbox, summary.parked_events, summary.dead_letters) == (0, 0, 0), report

        # The traffic reached the paths it was meant to.
        outcomes = {outcome for _, outcome in summary.turns_by_state}
        assert outcomes == {"completed", "failed", "aborted"}, report
        assert result.stats["early events seen parked"] >= 1, report
        assert result.stats["replayed decisions"] >= 1, report
        # The limit user's chats each stop at their first refusal.
        assert summary.decisions.get(("turn.requested", "reject", "quota_exceeded")) == LIMIT_CHATS, report
        assert summary.decisions.get(("turn.requested", "downgrade", "-"), 0) >= 2, report
        assert all(code in ("-", "quota_exceeded") for _, _, code in summary.decisions), report

        # Budget alerts: the limit user crossed thresholds of the demo tenant's daily limits; each
        # is on `quota-alerts` and the summary prints it (user short id, bucket, threshold).
        demo_alerts = [a for a in summary.alerts if a.tenant_id == DEMO_TENANT_ID]
        assert {(a.bucket, a.period_type, a.threshold_percent) for a in demo_alerts} >= {
            ("total", "daily", 50),
            ("tier:premium", "daily", 50),
        }, report
        assert summary.published_alerts == len(summary.alerts), report
        for a in summary.alerts:
            assert a.spent_credits_micro * 100 >= a.threshold_percent * a.limit_credits_micro, report
        lines = render(summary).splitlines()
        start = lines.index("budget alerts (quota.threshold_crossed)")
        shown = " ".join(lines[start : start + 3 + len(summary.alerts)])
        for a in demo_alerts:
            assert short_id(a.user_id) in shown and a.bucket in shown, report
