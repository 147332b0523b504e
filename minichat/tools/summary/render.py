"""A `Summary` as plain aligned tables, then one line per failed invariant (or OK)."""

from __future__ import annotations

from uuid import UUID

from minichat.tools.summary.books import OK_LINE, Summary
from minichat.tools.summary.spend import SpendLine, SpendReport
from minichat.tools.tables import format_credits, format_table


def short_id(value: UUID) -> str:
    """The first 8 hex digits of an id: enough to tell a summary's users apart."""
    return str(value)[:8]


def alerts_table(s: Summary) -> str:
    """The stored budget alerts: tenant and user short ids, bucket, window, threshold."""
    return format_table(
        ["tenant", "user", "bucket", "period", "threshold_pct", "spent_micro", "limit_micro"],
        [
            [
                short_id(a.tenant_id),
                short_id(a.user_id),
                a.bucket,
                f"{a.period_type} {a.period_start}",
                a.threshold_percent,
                a.spent_credits_micro,
                a.limit_credits_micro,
            ]
            for a in s.alerts
        ],
    )


def spend_tables(report: SpendReport) -> str:
    """A tenant's spend report (`GET /v1/usage`) by user, then by model, each with an `all` line."""
    head = f"spend report (GET /v1/usage) of tenant {report.tenant_id}, {report.start} to {report.end}"
    return "\n".join(
        [
            f"{head}, group_by=user",
            _spend_table("user", report.by_user, short=True),
            "group_by=model",
            _spend_table("model", report.by_model, short=False),
        ]
    )


def _spend_table(name: str, lines: tuple[SpendLine, ...], *, short: bool) -> str:
    rows: list[list[object]] = [
        [
            short_id(UUID(line.key)) if short else line.key,
            *line.figures,
            format_credits(line.charged_credits_micro),
        ]
        for line in lines
    ]
    totals = [sum(line.figures[i] for line in lines) for i in range(4)]
    rows.append(["all", *totals, format_credits(totals[3])])
    return format_table([name, "turns", "input_tokens", "output_tokens", "charged_micro", "credits"], rows)


def invariants_table(s: Summary) -> str:
    """The figures each invariant compares, one check per line."""
    spend_check = f"spend report lines off the settled turns ({len(s.spend_reports)} tenant(s))"
    checks: list[list[object]] = [
        ["accepted turns (decisions)", s.accepted_turns],
        ["stored turns", s.stored_turns],
        ["settled turns", s.settled_turns],
        ["reserves held (micro-credits, must be 0)", s.reserved_credits_micro],
        ["billing-usage records (raw)", s.billing_records],
        ["usage.settled after dedupe (must = settled turns)", s.settled_events],
        ["settled turns missing a usage.settled", s.missing_billing],
        ["usage.settled matching no settled turn", s.unexpected_billing],
        ["adjusted turns", s.adjusted_turns],
        ["usage.adjusted after dedupe (must = adjusted turns)", s.adjusted_events],
        ["budget alerts stored", len(s.alerts)],
        ["alerts on quota-alerts after dedupe (must = stored)", s.published_alerts],
        *([[spend_check, len(s.spend_mismatches)]] if s.spend_reports else []),
        ["outbox rows not published", s.unpublished_outbox],
        ["quota total rows off their charges", len(s.quota_mismatches)],
        ["parked events left", s.parked_events],
        ["dead letters", s.dead_letters],
    ]
    return format_table(["check", "value"], checks)


def render(s: Summary, *, verdict: bool = True) -> str:
    """The summary as plain-text tables, then (with `verdict`) one line per failed invariant or OK."""
    parts: list[str] = []
    parts.append("turns by state and billing outcome")
    parts.append(
        format_table(
            ["state", "billing_outcome", "turns"],
            [[state, outcome, n] for (state, outcome), n in sorted(s.turns_by_state.items())],
        )
    )
    parts.append("\ncredits charged per tenant")
    rows: list[list[object]] = [
        [str(c.tenant_id), c.settled_turns, c.charged_micro, format_credits(c.charged_micro), c.billed_micro]
        for c in s.credits
    ]
    rows.append(
        [
            "all",
            sum(c.settled_turns for c in s.credits),
            s.charged_micro,
            format_credits(s.charged_micro),
            sum(c.billed_micro for c in s.credits),
        ]
    )
    parts.append(format_table(["tenant", "turns", "charged_micro", "credits", "billed_micro"], rows))
    parts.append("\ndecisions")
    parts.append(
        format_table(
            ["command", "decision", "error_code", "count"],
            [[*key, n] for key, n in sorted(s.decisions.items())],
        )
    )
    parts.append("\nbudget alerts (quota.threshold_crossed)")
    parts.append(alerts_table(s))
    if s.spend is not None:
        parts.append("\n" + spend_tables(s.spend))
    parts.append("\ninvariants")
    parts.append(invariants_table(s))
    if verdict:
        parts.append("")
        parts.extend([f"FAILED: {f}" for f in s.failures] or [OK_LINE])
    return "\n".join(parts)
