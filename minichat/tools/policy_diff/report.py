"""What `minichat policy diff` reports, per tenant: the commands of the window whose decision or
code would change (recorded -> candidate, with counts), the credits charged for their turns
(recorded vs candidate), the reserves refused (`quota_exceeded`), the users most affected (ids
only) and the budget alerts. Money in integer micro-credits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from minichat.storage.policy_diff import Charge, OutcomeCount

TOP_USERS = 10
REFUSED = "quota_exceeded"
NO_DECISION = "none"
"""A command the workers had not decided (nothing on `turn-decisions`) when the dry run began."""


def outcome(decision: str, code: str | None) -> str:
    """`allow`, `downgrade`, `reject/quota_exceeded`, ... (`none`: nothing recorded)."""
    return f"{decision}/{code}" if code else decision


@dataclass
class UserImpact:
    user_id: UUID
    changed: int = 0
    charged_recorded: int = 0
    charged_candidate: int = 0

    @property
    def score(self) -> tuple[int, int]:
        return (self.changed, abs(self.charged_candidate - self.charged_recorded))

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": str(self.user_id),
            "changed_commands": self.changed,
            "charged_credits_micro": {"recorded": self.charged_recorded, "candidate": self.charged_candidate},
        }


@dataclass
class TenantDiff:
    tenant_id: UUID
    commands: int = 0
    changes: dict[tuple[str, str], int] = field(default_factory=dict)
    charged_recorded: int = 0
    charged_candidate: int = 0
    refused_recorded: int = 0
    refused_candidate: int = 0
    users: dict[UUID, UserImpact] = field(default_factory=dict)
    alerts_recorded: int | None = None
    alerts_candidate: int | None = None

    @property
    def changed(self) -> int:
        return sum(self.changes.values())

    def user(self, user_id: UUID) -> UserImpact:
        return self.users.setdefault(user_id, UserImpact(user_id))

    def most_affected(self) -> list[UserImpact]:
        hit = [u for u in self.users.values() if u.score != (0, 0)]
        return sorted(hit, key=lambda u: (-u.score[0], -u.score[1], str(u.user_id)))[:TOP_USERS]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": str(self.tenant_id),
            "commands": self.commands,
            "changed": self.changed,
            "changes": [
                {"recorded": r, "candidate": c, "count": n} for (r, c), n in sorted(self.changes.items())
            ],
            "charged_credits_micro": {"recorded": self.charged_recorded, "candidate": self.charged_candidate},
            "reserves_refused": {"recorded": self.refused_recorded, "candidate": self.refused_candidate},
            "most_affected_users": [u.as_dict() for u in self.most_affected()],
            "alerts": None
            if self.alerts_candidate is None
            else {"recorded": self.alerts_recorded or 0, "candidate": self.alerts_candidate},
        }

    def lines(self) -> list[str]:
        out = [
            f"tenant {self.tenant_id}: {self.commands} command(s) in the window, {self.changed} would change"
        ]
        if self.changes:
            width = max(len(f"{r} -> {c}") for r, c in self.changes)
            out.append(f"  {'recorded -> candidate':<{width}}  commands")
            out.extend(f"  {f'{r} -> {c}':<{width}}  {n:>8}" for (r, c), n in sorted(self.changes.items()))
        delta = self.charged_candidate - self.charged_recorded
        out.append(
            f"  credits charged (micro): recorded {self.charged_recorded}, candidate "
            f"{self.charged_candidate} ({delta:+d})"
        )
        out.append(
            f"  reserves refused: recorded {self.refused_recorded}, candidate {self.refused_candidate}"
        )
        top = self.most_affected()
        out.append("  most affected users: " + ("none" if not top else ""))
        out.extend(
            f"    {u.user_id}  {u.changed} command(s), charged {u.charged_recorded} -> {u.charged_candidate}"
            for u in top
        )
        if self.alerts_candidate is None:
            out.append("  alerts: n/a (this version of minichat has no budget alerts)")
        else:
            out.append(f"  alerts: recorded {self.alerts_recorded or 0}, candidate {self.alerts_candidate}")
        return out


@dataclass
class DiffReport:
    candidate_version: int
    from_time: datetime | None
    to_time: datetime
    tenants: list[TenantDiff]
    rebuild: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate_version": self.candidate_version,
            "from_time": self.from_time.isoformat() if self.from_time else None,
            "to_time": self.to_time.isoformat(),
            "tenants": [t.as_dict() for t in self.tenants],
            "rebuild": self.rebuild,
        }

    def lines(self) -> list[str]:
        since = self.from_time.isoformat() if self.from_time else "the beginning"
        out = [
            f"policy diff: candidate version {self.candidate_version}, commands from {since} to "
            f"{self.to_time.isoformat()} decided under it ({self.rebuild.get('read', 0)} records rebuilt)"
        ]
        for tenant in self.tenants:
            out.extend(tenant.lines())
        if not self.tenants:
            out.append("no tenant has commands in the topics")
        return out


def build_report(
    tenants: Sequence[UUID],
    outcomes: Iterable[OutcomeCount],
    changed_users: Iterable[tuple[UUID, UUID | None]],
    candidate_charges: Iterable[Charge],
    recorded_charges: Iterable[Charge],
    alerts: tuple[Mapping[UUID, int], Mapping[UUID, int]] | None,
) -> list[TenantDiff]:
    """Per tenant, in the order given. `changed_users`: (tenant, user) of each changed command.
    `alerts`: (recorded, candidate) per tenant, or None when
    this version has none."""
    by_tenant = {t: TenantDiff(t) for t in tenants}
    for row in outcomes:
        diff = by_tenant[row.tenant_id]
        recorded, candidate = (
            outcome(row.recorded, row.recorded_code),
            outcome(row.candidate, row.candidate_code),
        )
        diff.commands += row.n
        diff.refused_recorded += row.n if row.recorded_code == REFUSED else 0
        diff.refused_candidate += row.n if row.candidate_code == REFUSED else 0
        if recorded != candidate:
            diff.changes[(recorded, candidate)] = diff.changes.get((recorded, candidate), 0) + row.n
    for tenant, user in changed_users:
        if user is not None:
            by_tenant[tenant].user(user).changed += 1
    for charge in recorded_charges:
        diff = by_tenant[charge.tenant_id]
        diff.charged_recorded += charge.charged
        if charge.user_id is not None:
            diff.user(charge.user_id).charged_recorded += charge.charged
    for charge in candidate_charges:
        diff = by_tenant[charge.tenant_id]
        diff.charged_candidate += charge.charged
        if charge.user_id is not None:
            diff.user(charge.user_id).charged_candidate += charge.charged
    if alerts is not None:
        for diff in by_tenant.values():
            diff.alerts_recorded = alerts[0].get(diff.tenant_id, 0)
            diff.alerts_candidate = alerts[1].get(diff.tenant_id, 0)
    return list(by_tenant.values())
