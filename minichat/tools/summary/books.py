"""The books of a deployment, pure: stored rows and billing events in, a `Summary` with its broken
money invariants out. Money is integer micro-credits throughout."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Final
from uuid import UUID

from minichat.models.events import dedupe_key
from minichat.tools.summary.spend import SpendReport, spend_books, spend_mismatches


@dataclass(frozen=True)
class TenantCredits:
    tenant_id: UUID
    settled_turns: int
    charged_micro: int
    """Sum of `committed_credits_micro` of the tenant's settled turns (the database's view)."""
    billed_micro: int
    """Sum over the tenant's turns on `billing-usage` of the latest charge (adjusted, else settled)."""


@dataclass(frozen=True)
class AlertLine:
    """One stored budget alert (`quota_alerts`): a threshold a user's window has crossed."""

    tenant_id: UUID
    user_id: UUID
    bucket: str
    period_type: str
    period_start: date
    threshold_percent: int
    spent_credits_micro: int
    limit_credits_micro: int


@dataclass(frozen=True)
class Summary:
    """One look at a deployment (or at some of its tenants); `failures` names broken invariants."""

    turns_by_state: dict[tuple[str, str], int]
    """(state, billing_outcome or "-" while unsettled) -> turns."""
    decisions: dict[tuple[str, str, str], int]
    """(command, decision, error_code or "-") -> stored decisions (one per decided command)."""
    credits: tuple[TenantCredits, ...]
    accepted_turns: int
    """Stored decisions that accepted a turn (allow or downgrade)."""
    stored_turns: int
    settled_turns: int
    adjusted_turns: int
    reserved_credits_micro: int
    """Sum of `reserved_credits_micro` over the quota rows: 0 once every turn settled."""
    billing_records: int
    """Records on `billing-usage` before de-duplication (the relay may repeat one)."""
    settled_events: int
    """Distinct `dedupe_key`s of `usage.settled`."""
    adjusted_events: int
    """Distinct `dedupe_key`s of `usage.adjusted`."""
    missing_billing: int
    """Settled turns without a `usage.settled` event."""
    unexpected_billing: int
    """Distinct `usage.settled` keys that match no settled turn."""
    missing_adjustments: int
    """Adjusted turns without a `usage.adjusted` event."""
    unpublished_outbox: int
    dead_letters: int
    parked_events: int
    quota_mismatches: tuple[str, ...]
    """`total` rows whose `spent` differs from the charges of the turns settled on them."""
    alerts: tuple[AlertLine, ...] = ()
    """Stored budget alerts, by tenant, user, window, bucket and threshold."""
    published_alerts: int = 0
    """Distinct `event_id`s on `quota-alerts` (the relay may repeat one)."""
    unpublished_alerts: int = 0
    """Stored alerts whose `event_id` is not on `quota-alerts`, plus events there matching no row."""
    spend_reports: tuple[SpendReport, ...] = ()
    """Tenants' spend reports as `GET /v1/usage` computes them, each checked against the books."""
    spend_tenant: UUID | None = None
    """The tenant whose spend report the summary prints."""
    spend_mismatches: tuple[str, ...] = ()
    """Lines of `spend_reports` whose figures differ from the settled turns' own."""
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def charged_micro(self) -> int:
        return sum(c.charged_micro for c in self.credits)

    @property
    def spend(self) -> SpendReport | None:
        """The spend report the summary prints (of `spend_tenant`), if one was read."""
        return next((r for r in self.spend_reports if r.tenant_id == self.spend_tenant), None)


def check_invariants(s: Summary) -> tuple[str, ...]:
    """The failed invariants of a summary, each as one line (empty when all hold)."""
    failures: list[str] = []
    unsettled = s.stored_turns - s.settled_turns
    if unsettled:
        failures.append(f"{unsettled} accepted turn(s) not settled")
    if s.accepted_turns != s.stored_turns:
        failures.append(f"accepted decisions ({s.accepted_turns}) != stored turns ({s.stored_turns})")
    if s.reserved_credits_micro:
        failures.append(f"reserves still held: {s.reserved_credits_micro} micro-credits (must be 0)")
    if s.settled_events != s.settled_turns:
        failures.append(
            f"billing: {s.settled_events} distinct usage.settled event(s) "
            f"!= {s.settled_turns} settled turn(s)"
        )
    if s.missing_billing:
        failures.append(f"billing: {s.missing_billing} settled turn(s) have no usage.settled event")
    if s.unexpected_billing:
        failures.append(f"billing: {s.unexpected_billing} usage.settled event(s) match no settled turn")
    if s.missing_adjustments or s.adjusted_events != s.adjusted_turns:
        failures.append(
            f"billing: {s.adjusted_events} distinct usage.adjusted event(s) for {s.adjusted_turns} "
            f"adjusted turn(s), {s.missing_adjustments} missing"
        )
    differing = [c for c in s.credits if c.billed_micro != c.charged_micro]
    if differing:
        failures.append(
            f"billed credits differ from stored charges for {len(differing)} tenant(s): "
            + ", ".join(f"{c.tenant_id} billed {c.billed_micro} stored {c.charged_micro}" for c in differing)
        )
    if s.quota_mismatches:
        failures.append(
            f"quota spent != settled charges on {len(s.quota_mismatches)} total row(s): "
            + "; ".join(s.quota_mismatches[:5])
        )
    if s.unpublished_alerts:
        failures.append(
            f"alerts: {len(s.alerts)} stored, {s.published_alerts} distinct on quota-alerts, "
            f"{s.unpublished_alerts} not matching"
        )
    if s.spend_mismatches:
        failures.append(
            f"spend report (GET /v1/usage) != settled turns on {len(s.spend_mismatches)} line(s): "
            + "; ".join(s.spend_mismatches[:5])
        )
    if s.unpublished_outbox:
        failures.append(f"{s.unpublished_outbox} outbox row(s) not published")
    if s.parked_events:
        failures.append(f"{s.parked_events} parked event(s) left")
    return tuple(failures)


OK_LINE: Final = "OK: every accepted turn settled once, no reserve held, billing complete"


Row = dict[str, Any]
"""A database row or a decoded billing event, as `summarize` hands them over."""


def build_summary(
    *,
    turns: Sequence[Row],
    decisions: Sequence[Row],
    quota_rows: Sequence[Row],
    reserved_credits_micro: int,
    unpublished_outbox: int,
    parked_events: int,
    billing: Sequence[Row],
    dead_letters: int,
    alerts: Sequence[Row] = (),
    alert_events: Sequence[Row] = (),
    spend_reports: Sequence[SpendReport] = (),
    spend_tenant: UUID | None = None,
) -> Summary:
    """The pure part of `summarize`: rows and decoded billing events in, `Summary` out. Each of
    `spend_reports` (as the read API answers them) is checked against its tenant's settled turns."""
    by_decision = _decision_counts(decisions)
    settled = [t for t in turns if t["settled"]]
    settled_keys, adjusted_keys = _billing_keys(settled)
    settled_events, adjusted_events = _billing_events(billing)
    summary = Summary(
        turns_by_state=dict(Counter((str(t["state"]), str(t["billing_outcome"] or "-")) for t in turns)),
        decisions=dict(by_decision),
        credits=_tenant_credits(turns, settled, _billed(settled_events, adjusted_events)),
        accepted_turns=sum(n for (_, d, _), n in by_decision.items() if d in ("allow", "downgrade")),
        stored_turns=len(turns),
        settled_turns=len(settled),
        adjusted_turns=len(adjusted_keys),
        reserved_credits_micro=reserved_credits_micro,
        billing_records=len(billing),
        settled_events=len(settled_events),
        adjusted_events=len(adjusted_events),
        missing_billing=len(settled_keys - settled_events.keys()),
        unexpected_billing=len(settled_events.keys() - settled_keys),
        missing_adjustments=len(adjusted_keys - adjusted_events.keys()),
        unpublished_outbox=unpublished_outbox,
        dead_letters=dead_letters,
        parked_events=parked_events,
        quota_mismatches=quota_mismatches(settled, quota_rows),
        **_alert_fields(alerts, alert_events),
        spend_reports=tuple(spend_reports),
        spend_tenant=spend_tenant,
        spend_mismatches=tuple(
            f"tenant {r.tenant_id} {line}"
            for r in spend_reports
            for line in spend_mismatches(r, spend_books(turns, r.tenant_id, r.start, r.end))
        ),
    )
    return replace(summary, failures=check_invariants(summary))


def _alert_fields(alerts: Sequence[Row], events: Sequence[Row]) -> dict[str, Any]:
    """The stored alerts, and how the `quota-alerts` topic (de-duplicated on `event_id`) matches them."""
    stored = {str(a["event_id"]) for a in alerts}
    sent = {str(e["event_id"]) for e in events if e.get("type") == "quota.threshold_crossed"}
    lines = tuple(
        AlertLine(
            a["tenant_id"],
            a["user_id"],
            str(a["bucket"]),
            str(a["period_type"]),
            a["period_start"],
            int(a["threshold_percent"]),
            int(a["spent_credits_micro"]),
            int(a["limit_credits_micro"]),
        )
        for a in alerts
    )
    return {"alerts": lines, "published_alerts": len(sent), "unpublished_alerts": len(stored ^ sent)}


def _decision_counts(decisions: Sequence[Row]) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for d in decisions:
        counts[(str(d["command"]), str(d["decision"]), str(d["error_code"]))] += int(d["n"])
    return counts


def _billing_keys(settled: Sequence[Row]) -> tuple[set[str], set[str]]:
    """The `dedupe_key`s billing must have seen: one per settled turn, one per adjusted turn."""
    settled_keys = {dedupe_key(t["tenant_id"], t["id"], t["request_id"]) for t in settled}
    adjusted_keys = {
        dedupe_key(t["tenant_id"], t["id"], t["request_id"], adjusted=True) for t in settled if t["adjusted"]
    }
    return settled_keys, adjusted_keys


def _billing_events(billing: Sequence[Row]) -> tuple[dict[str, Row], dict[str, Row]]:
    """`usage.settled` and `usage.adjusted` by `dedupe_key`, the first copy of each."""
    settled_events: dict[str, Row] = {}
    adjusted_events: dict[str, Row] = {}
    for event in billing:
        key = event.get("dedupe_key")
        if not isinstance(key, str):
            continue
        if event.get("type") == "usage.settled":
            settled_events.setdefault(key, event)
        elif event.get("type") == "usage.adjusted":
            adjusted_events.setdefault(key, event)
    return settled_events, adjusted_events


def _billed(settled_events: dict[str, Row], adjusted_events: dict[str, Row]) -> dict[str, tuple[str, int]]:
    """What billing charges per turn (settled key -> (tenant, micro-credits)): the adjusted amount
    when there is one, else the settled one."""
    billed: dict[str, tuple[str, int]] = {}
    for key, event in settled_events.items():
        billed[key] = (str(event.get("tenant_id")), int(event.get("committed_credits_micro") or 0))
    for key, event in adjusted_events.items():
        base = key.removesuffix("/adjusted")
        billed[base] = (str(event.get("tenant_id")), int(event.get("committed_credits_micro") or 0))
    return billed


def _tenant_credits(
    turns: Sequence[Row], settled: Sequence[Row], billed: dict[str, tuple[str, int]]
) -> tuple[TenantCredits, ...]:
    tenants = sorted({t["tenant_id"] for t in turns}, key=str)
    return tuple(
        TenantCredits(
            tenant_id=tenant,
            settled_turns=sum(1 for t in settled if t["tenant_id"] == tenant),
            charged_micro=sum(
                int(t["committed_credits_micro"] or 0) for t in settled if t["tenant_id"] == tenant
            ),
            billed_micro=sum(micro for owner, micro in billed.values() if owner == str(tenant)),
        )
        for tenant in tenants
    )


def quota_mismatches(settled: Sequence[Row], quota_rows: Sequence[Row]) -> tuple[str, ...]:
    """Compare each `total` row's `spent` with the sum of the charges of the turns settled on it
    (a turn settles on the daily and monthly rows of its stored periods, attributed to its requester)."""
    expected: Counter[tuple[UUID, UUID, str, date]] = Counter()
    for t in settled:
        user = t["requester_user_id"]
        charge = int(t["committed_credits_micro"] or 0)
        expected[(t["tenant_id"], user, "daily", t["period_daily"])] += charge
        expected[(t["tenant_id"], user, "monthly", t["period_monthly"])] += charge
    actual: dict[tuple[UUID, UUID, str, date], int] = {
        (r["tenant_id"], r["user_id"], str(r["period_type"]), r["period_start"]): int(
            r["spent_credits_micro"]
        )
        for r in quota_rows
    }
    problems = []
    for key in sorted(expected.keys() | actual.keys(), key=str):
        if expected.get(key, 0) != actual.get(key, 0):
            tenant, user, period_type, start = key
            spent, charges = actual.get(key, 0), expected.get(key, 0)
            problems.append(f"{tenant}/{user} {period_type} {start}: spent {spent}, charges {charges}")
    return tuple(problems)
