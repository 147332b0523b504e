"""`minichat policy diff` end to end: the scratch books, the rebuild with the window decided
afresh under the candidate, the comparison read on the rebuild's connection (the recorded
decisions are in its temporary table) and, read-only, on the live database (the recorded
charges and alerts)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import asyncpg

from minichat.models.policy import load_policy
from minichat.settings import Settings
from minichat.storage.db import connect
from minichat.storage.policy_diff import (
    Charge,
    OutcomeCount,
    changed_commands,
    window_charges,
    window_outbox_events,
    window_outcomes,
)
from minichat.tools.policy_diff.alerts import ALERT_EVENT, alerts_supported
from minichat.tools.policy_diff.report import DiffReport, build_report
from minichat.tools.policy_diff.scratch import DiffSetupError, scratch_books
from minichat.tools.rebuild import run_rebuild
from minichat.tools.rebuild.afresh import Seen

__all__ = ["DiffOptions", "DiffSetupError", "run_diff"]


@dataclass(frozen=True)
class DiffOptions:
    candidate: Path
    from_time: datetime | None = None
    """Commands from this event time on are decided under the candidate (None: every command)."""
    to_time: datetime | None = None
    """... until this one, excluded (None: when the dry run starts); later ones follow the log."""
    tenants: tuple[uuid.UUID, ...] = ()
    """Report only these (None: every tenant with a command in the topics)."""
    scratch_database_url: str | None = None
    show_progress: bool = False
    progress: TextIO | None = None


@dataclass
class _Found:
    tenants: list[uuid.UUID]
    outcomes: list[OutcomeCount]
    changed: list[tuple[uuid.UUID, uuid.UUID | None]]
    charges: list[Charge]
    alerts: dict[uuid.UUID, int] | None


async def run_diff(settings: Settings, options: DiffOptions) -> DiffReport:
    """Raises `PolicyError` (the candidate), `PolicyConflict` (its version is recorded with other
    content), `DiffSetupError`, `RebuildSetupError`."""
    candidate = load_policy(options.candidate)
    start, end = options.from_time, options.to_time or datetime.now(UTC)
    if start is not None and start >= end:
        raise DiffSetupError("--from-time must be before --to-time (and before now)")

    def afresh(at: datetime) -> bool:
        return (start is None or at >= start) and at < end

    found: list[_Found] = []

    async def inspect(con: asyncpg.Connection, seen: Seen) -> None:
        found.append(await _read_dry_run(con, seen, options.tenants, start, end))

    async with scratch_books(settings, options.scratch_database_url) as url:
        dry = settings.model_copy(
            update={"database_url": url, "admin_database_url": url, "policy_file": options.candidate}
        )
        summary = await run_rebuild(
            dry,
            progress=options.progress,
            show_progress=options.show_progress,
            check_workers=False,
            afresh=afresh,
            follow_recorded_alerts=False,  # the candidate's alerts are compared with the recorded ones
            inspect=inspect,
            label="policy diff",
        )
    [dry_run] = found
    live = await connect(settings)
    try:
        recorded = await window_charges(live, dry_run.tenants, start, end)
        recorded_alerts = (
            await window_outbox_events(live, dry_run.tenants, start, end, ALERT_EVENT)
            if dry_run.alerts is not None
            else None
        )
    finally:
        await live.close()
    alerts = (recorded_alerts or {}, dry_run.alerts) if dry_run.alerts is not None else None
    tenants = build_report(
        dry_run.tenants, dry_run.outcomes, dry_run.changed, dry_run.charges, recorded, alerts
    )
    return DiffReport(candidate.version, start, end, tenants, summary.as_dict())


async def _read_dry_run(
    con: asyncpg.Connection,
    seen: Seen,
    wanted: tuple[uuid.UUID, ...],
    start: datetime | None,
    end: datetime,
) -> _Found:
    """The dry run's books of the window, on the rebuild's connection."""
    tenants = list(dict.fromkeys(wanted)) or sorted(seen.tenants, key=str)
    changed = [
        (tenant, seen.users.get((chat, command)))
        for tenant, chat, command in await changed_commands(con, tenants, start, end)
    ]
    alerts = None
    if alerts_supported():
        alerts = await window_outbox_events(con, tenants, start, end, ALERT_EVENT)
    return _Found(
        tenants,
        await window_outcomes(con, tenants, start, end),
        changed,
        await window_charges(con, tenants, start, end),
        alerts,
    )
