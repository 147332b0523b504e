"""The summary's spend report, pure: the rows `GET /v1/usage` answers for one tenant (read by the
read API's own statement, `storage.read_api.spend_rows`, under the tenant's reading role), the same
report computed from the settled turns themselves (the books), and where the two differ.

The report reads the daily `total` quota rows and their per-model split; the books read
`chat_turns`. Both paths are written by the same settlement, so any difference is a bug the demo
must fail on. Integers only; ids and model names, never message content."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any
from uuid import UUID

SPEND_GROUPS = ("user", "model")
"""The report's two groupings in the summary: `group_by=user`, then `group_by=model`."""


@dataclass(frozen=True)
class SpendLine:
    """One row of the report: a user id or a model id, and its settled figures."""

    key: str
    turns: int
    input_tokens: int
    output_tokens: int
    charged_credits_micro: int

    @property
    def figures(self) -> tuple[int, int, int, int]:
        return (self.turns, self.input_tokens, self.output_tokens, self.charged_credits_micro)


@dataclass(frozen=True)
class SpendReport:
    """A tenant's spend over UTC days `start`..`end` (both included), by user and by model."""

    tenant_id: UUID
    start: date
    end: date
    by_user: tuple[SpendLine, ...]
    by_model: tuple[SpendLine, ...]

    @property
    def charged_micro(self) -> int:
        return sum(line.charged_credits_micro for line in self.by_user)


def report_lines(rows: Iterable[Mapping[str, Any]], column: str) -> tuple[SpendLine, ...]:
    """Rows of `spend_rows` grouped by one key (`column` is `user_id` or `model`), as lines."""
    return tuple(
        SpendLine(
            str(r[column]),
            int(r["turns"]),
            int(r["input_tokens"]),
            int(r["output_tokens"]),
            int(r["charged_credits_micro"]),
        )
        for r in rows
    )


def spend_days(turns: Sequence[Mapping[str, Any]], tenant: UUID) -> tuple[date, date] | None:
    """The first and last day of the tenant's settled turns (their daily quota periods), if any."""
    days = [t["period_daily"] for t in turns if t["settled"] and t["tenant_id"] == tenant]
    return (min(days), max(days)) if days else None


def spend_books(turns: Sequence[Mapping[str, Any]], tenant: UUID, start: date, end: date) -> SpendReport:
    """The report computed from the tenant's settled turns: a turn counts once, its tokens when it
    was priced on actual usage (an estimate prices none), its charge as settled or adjusted."""
    by_user: dict[str, list[int]] = {}
    by_model: dict[str, list[int]] = {}
    for t in turns:
        if not t["settled"] or t["tenant_id"] != tenant or not start <= t["period_daily"] <= end:
            continue
        actual = t["settlement_method"] == "actual"
        figures = (
            1,
            int(t["input_tokens"] or 0) if actual else 0,
            int(t["output_tokens"] or 0) if actual else 0,
            int(t["committed_credits_micro"] or 0),
        )
        for groups, key in ((by_user, str(t["requester_user_id"])), (by_model, str(t["effective_model"]))):
            current = groups.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate(figures):
                current[i] += value
    return SpendReport(tenant, start, end, _lines(by_user), _lines(by_model))


def _lines(groups: dict[str, list[int]]) -> tuple[SpendLine, ...]:
    """Sorted as the report sorts: by the key's bytes."""
    return tuple(SpendLine(key, *groups[key]) for key in sorted(groups, key=str.encode))


def spend_mismatches(report: SpendReport, books: SpendReport) -> tuple[str, ...]:
    """Each report line whose figures differ from the books' (or that only one side has), as text:
    `user <id>: report (turns, input, output, charged) ... books ...`."""
    problems: list[str] = []
    for group, got, want in (
        ("user", report.by_user, books.by_user),
        ("model", report.by_model, books.by_model),
    ):
        shown = {line.key: line.figures for line in got}
        kept = {line.key: line.figures for line in want}
        for key in sorted(shown.keys() | kept.keys()):
            if shown.get(key) != kept.get(key):
                problems.append(f"{group} {key}: report {shown.get(key)}, books {kept.get(key)}")
        if shown == kept and [line.key for line in got] != [line.key for line in want]:
            problems.append(f"{group}: report rows out of order")
    return tuple(problems)
