"""`summarize`: the database and the `billing-usage`, `quota-alerts` and `dead-letters` topics, read
once."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any
from uuid import UUID

import asyncpg

from minichat.models.topics import TopicNames
from minichat.settings import Settings
from minichat.storage.summary import summary_rows
from minichat.tools.kafka import read_topic
from minichat.tools.summary.books import Summary, build_summary


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


async def summarize(settings: Settings, tenants: Collection[UUID] | None = None) -> Summary:
    """Read the database and the billing, alert and dead-letter topics; `tenants` limits it to those."""
    names = TopicNames(settings.topic_prefix)
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await summary_rows(con, tenants)
    finally:
        await con.close()
    turn_rows, decision_rows, quota_rows = rows.turns, rows.decisions, rows.quota
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
        turns=[dict(r) for r in turn_rows],
        decisions=[dict(r) for r in decision_rows],
        quota_rows=[dict(r) for r in quota_rows],
        reserved_credits_micro=int(reserved),
        unpublished_outbox=int(unpublished),
        parked_events=int(parked),
        billing=billing,
        dead_letters=len(dead),
        alerts=[dict(r) for r in rows.alerts],
        alert_events=alert_events,
    )


def _dead_letter_tenant(value: bytes | None) -> str | None:
    letter = _json_object(value)
    payload = letter.get("payload") if letter else None
    inner = _json_object(payload.encode("utf-8")) if isinstance(payload, str) else None
    tenant = inner.get("tenant_id") if inner else None
    return tenant if isinstance(tenant, str) else None
