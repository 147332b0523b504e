"""`summarize`: the database and the `billing-usage`, `quota-alerts` and `dead-letters` topics, read
once."""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import date
from typing import Any
from uuid import UUID

import asyncpg

from minichat.domain.spend import MAX_ROWS
from minichat.models.topics import TopicNames
from minichat.settings import Settings
from minichat.storage.read_api import reading_as, spend_rows
from minichat.storage.summary import summary_rows
from minichat.tools.kafka import read_topic
from minichat.tools.summary.books import Summary, build_summary
from minichat.tools.summary.spend import SPEND_GROUPS, SpendReport, report_lines, spend_days


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _in_scope(tenant: object, tenants: Collection[str] | None) -> bool:
    return tenants is None or (isinstance(tenant, str) and tenant in tenants)


async def summarize(
    settings: Settings, tenants: Collection[UUID] | None = None, *, spend_tenant: UUID | None = None
) -> Summary:
    """Read the database and the billing, alert and dead-letter topics; `tenants` limits it to those.
    With `spend_tenant`, also every tenant's spend report over the days of its settled turns (each
    checked against the books), `spend_tenant`'s to be printed."""
    names = TopicNames(settings.topic_prefix)
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await summary_rows(con, tenants)
    finally:
        await con.close()
    turns = [dict(r) for r in rows.turns]
    spend = [] if spend_tenant is None else await read_spend(settings, turns)
    decision_rows, quota_rows = rows.decisions, rows.quota
    reserved = rows.backlog.reserved_credits_micro
    unpublished = rows.backlog.unpublished_outbox
    parked = rows.backlog.parked_events

    scope = None if tenants is None else {str(t) for t in tenants}
    billing = [
        v
        for v in (_json_object(value) for _, value in await read_topic(settings, names.billing_usage))
        if v is not None and _in_scope(v.get("tenant_id"), scope)
    ]
    alert_events = [
        v
        for v in (_json_object(value) for _, value in await read_topic(settings, names.quota_alerts))
        if v is not None and _in_scope(v.get("tenant_id"), scope)
    ]
    dead = [
        value
        for _, value in await read_topic(settings, names.dead_letters)
        if scope is None or _dead_letter_tenant(value) in scope
    ]
    return build_summary(
        turns=turns,
        decisions=[dict(r) for r in decision_rows],
        quota_rows=[dict(r) for r in quota_rows],
        reserved_credits_micro=int(reserved),
        unpublished_outbox=int(unpublished),
        parked_events=int(parked),
        billing=billing,
        dead_letters=len(dead),
        alerts=[dict(r) for r in rows.alerts],
        alert_events=alert_events,
        spend_reports=spend,
        spend_tenant=spend_tenant,
    )


async def read_spend(settings: Settings, turns: list[dict[str, Any]]) -> list[SpendReport]:
    """The spend report of each tenant with settled `turns`, over their days, by user and by model."""
    tenants = sorted({t["tenant_id"] for t in turns}, key=str)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        reports = []
        for tenant in tenants:
            days = spend_days(turns, tenant)
            if days is not None:
                reports.append(await _spend_report(pool, tenant, *days))
        return reports
    finally:
        await pool.close()


async def _spend_report(pool: asyncpg.Pool, tenant: UUID, start: date, end: date) -> SpendReport:
    """One tenant's report read as `GET /v1/usage` reads it: the read API's statement, in a
    read-only transaction as the tenant's reader (row-level security)."""
    grouped = []
    for group in SPEND_GROUPS:
        async with reading_as(pool, tenant) as con:
            grouped.append(await spend_rows(con, tenant, start, end, (group,), None, MAX_ROWS))
    by_user, by_model = grouped
    return SpendReport(tenant, start, end, report_lines(by_user, "user_id"), report_lines(by_model, "model"))


def _dead_letter_tenant(value: bytes | None) -> str | None:
    letter = _json_object(value)
    payload = letter.get("payload") if letter else None
    inner = _json_object(payload.encode("utf-8")) if isinstance(payload, str) else None
    tenant = inner.get("tenant_id") if inner else None
    return tenant if isinstance(tenant, str) else None
