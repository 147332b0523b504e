"""Which `quota-alerts` records a rebuild stores as recorded (tools/rebuild/sources.py
`recorded_alert`): a valid `quota.threshold_crossed`, keyed by its tenant, with the contract's id;
and the row stored from it is the row the settlement stored (storage/alerts.py `alert_row`)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest

from minichat.domain.ids import alert_event_id
from minichat.domain.quota import BucketKey
from minichat.models.events import QuotaThresholdCrossed
from minichat.storage.alerts import alert_row
from minichat.tools.rebuild.sources import recorded_alert

TENANT, USER, REQUEST = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
DAY = date(2026, 12, 7)


def event(**changes: Any) -> QuotaThresholdCrossed:
    fields: dict[str, Any] = {
        "event_id": alert_event_id(TENANT, USER, BucketKey("daily", DAY, "total"), 80),
        "tenant_id": TENANT,
        "user_id": USER,
        "bucket": "total",
        "period_type": "daily",
        "period_start": DAY,
        "threshold_percent": 80,
        "limit_credits_micro": 1_000_000,
        "spent_credits_micro": 800_004,
        "request_id": REQUEST,
        "occurred_at": datetime(2026, 12, 7, 2, 8, 2, 45000, tzinfo=UTC),
    }
    return QuotaThresholdCrossed(**{**fields, **changes})


def key(tenant: uuid.UUID = TENANT) -> bytes:
    return str(tenant).encode()


def test_a_published_alert_is_read_back_as_it_was_built() -> None:
    built = event()
    read = recorded_alert(key(), built.model_dump_json().encode())
    assert read == built
    assert read is not None
    assert alert_row(read) == alert_row(built)


def test_the_row_stored_from_a_record_is_the_settlements_row() -> None:
    row = alert_row(event())
    assert (row.tenant_id, row.user_id, row.bucket, row.period_type, row.period_start) == (
        TENANT, USER, "total", "daily", DAY,
    )  # fmt: skip
    assert (row.threshold_percent, row.limit_credits_micro) == (80, 1_000_000)
    assert row.spent_credits_micro == 800_004
    assert row.event_id == event().event_id and row.request_id == REQUEST
    assert row.dedupe_key == f"alert:{TENANT}:{USER}:total:daily:{DAY}:80"
    assert json.loads(row.payload) == json.loads(event().model_dump_json())


def _as_json(**changes: Any) -> bytes:
    payload = json.loads(event().model_dump_json())
    payload.update(changes)
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("record_key", "value"),
    [
        pytest.param(key(), b"not json", id="not-json"),
        pytest.param(key(), None, id="tombstone"),
        pytest.param(key(), b"[]", id="not-an-object"),
        pytest.param(key(), _as_json(type="usage.settled"), id="other-event-type"),
        pytest.param(key(), _as_json(unexpected=1), id="unknown-field"),
        pytest.param(key(), _as_json(threshold_percent=101), id="threshold-out-of-range"),
        pytest.param(key(), _as_json(spent_credits_micro=10), id="spend-below-the-threshold"),
        pytest.param(key(), _as_json(spent_credits_micro="800004"), id="money-as-text"),
        pytest.param(key(), _as_json(occurred_at="2026-12-07T02:08:02"), id="naive-time"),
        pytest.param(key(), _as_json(event_id=str(uuid.uuid4())), id="not-the-contract-id"),
        pytest.param(key(), _as_json(threshold_percent=50), id="id-of-another-threshold"),
        pytest.param(key(uuid.uuid4()), _as_json(), id="keyed-by-another-tenant"),
        pytest.param(None, _as_json(), id="no-key"),
    ],
)
def test_anything_else_is_not_an_alert(record_key: bytes | None, value: bytes | None) -> None:
    assert recorded_alert(record_key, value) is None
