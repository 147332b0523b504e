"""The demo end to end: `minichat simulate`'s traffic through a live worker, then the books.

A small plan (2 tenants x 2 users x 2 chats x 3 turns, plus the demo tenant's limit user) still
holds every scenario kind (tests/unit/test_simulator.py checks that), so this one run crosses
admission, parking, every settlement row, the watchdog's usage grace, late-usage adjustment, the
outbox relay, billing de-duplication and budget alerts (the limit user crosses 50 % of the demo
tenant's daily limits, and the summary lists it), and ends with the demo tenant's spend report as
`GET /v1/usage` computes it (by user and by model), whose totals are the settled turns' own.
"""

from __future__ import annotations

import io
from pathlib import Path
from uuid import UUID

import asyncpg
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
        summary = await summarize(live.settings, tenants=result.tenants, spend_tenant=DEMO_TENANT_ID)
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

        # The spend report of every tenant, read by the read API's own statement under the
        # tenant's reading role, matches the settled turns (the adjusted ones included); the demo
        # tenant's totals are the sums of its settled turns' charges, per user and per model, and
        # the summary prints both tables.
        assert summary.spend_mismatches == (), report
        assert {r.tenant_id for r in summary.spend_reports} == set(result.tenants), report
        assert sum(r.charged_micro for r in summary.spend_reports) == summary.charged_micro, report
        spend = summary.spend
        assert spend is not None and spend.tenant_id == DEMO_TENANT_ID, report
        con = await asyncpg.connect(live.settings.database_url)
        try:
            books = await con.fetch(
                "SELECT requester_user_id::text AS u, effective_model AS m, count(*) AS n,"
                " sum(committed_credits_micro)::bigint AS c, min(period_daily) AS first,"
                " max(period_daily) AS last FROM chat_turns"
                " WHERE tenant_id = $1 AND settled_at IS NOT NULL GROUP BY 1, 2",
                DEMO_TENANT_ID,
            )
        finally:
            await con.close()
        by_user: dict[str, list[int]] = {}
        by_model: dict[str, list[int]] = {}
        for b in books:
            for groups, key in ((by_user, b["u"]), (by_model, b["m"])):
                figures = groups.setdefault(key, [0, 0])
                figures[0] += b["n"]
                figures[1] += b["c"]
        assert by_user and by_model, report
        assert (spend.start, spend.end) == (min(b["first"] for b in books), max(b["last"] for b in books))
        assert {x.key: [x.turns, x.charged_credits_micro] for x in spend.by_user} == by_user, report
        assert {x.key: [x.turns, x.charged_credits_micro] for x in spend.by_model} == by_model, report
        demo_credits = next(c for c in summary.credits if c.tenant_id == DEMO_TENANT_ID)
        assert spend.charged_micro == demo_credits.charged_micro > 0, report
        lines = render(summary).splitlines()
        start = next(i for i, x in enumerate(lines) if x.startswith("spend report (GET /v1/usage)"))
        assert str(DEMO_TENANT_ID) in lines[start] and "group_by=user" in lines[start], report
        shown_users = table_cells(lines, start, len(spend.by_user))
        shown_models = table_cells(lines, lines.index("group_by=model", start), len(spend.by_model))
        # Columns: key, turns, input_tokens, output_tokens, charged_micro, credits.
        assert {(r[0], r[1], r[4]) for r in shown_users[:-1]} == {
            (short_id(UUID(u)), str(n), str(c)) for u, (n, c) in by_user.items()
        }, report
        assert {(r[0], r[1], r[4]) for r in shown_models[:-1]} == {
            (m, str(n), str(c)) for m, (n, c) in by_model.items()
        }, report
        total = ("all", str(sum(n for n, _ in by_user.values())), str(spend.charged_micro))
        assert (shown_users[-1][0], shown_users[-1][1], shown_users[-1][4]) == total, report
        assert (shown_models[-1][0], shown_models[-1][1], shown_models[-1][4]) == total, report
        assert "spend report lines off the settled turns" in report


def table_cells(lines: list[str], title: int, rows: int) -> list[list[str]]:
    """The cells of the table under the line `title`: its `rows` rows and its `all` line."""
    return [line.split() for line in lines[title + 3 : title + 3 + rows + 1]]
