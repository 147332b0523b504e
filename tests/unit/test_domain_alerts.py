"""The budget-alert rule (domain/alerts.py, docs/contract.md "quota.threshold_crossed"), pure."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import pytest

from minichat.domain.alerts import AlertStep, alert_floor, crossings, reached
from minichat.domain.ids import ID_NAMESPACE, alert_event_id
from minichat.domain.quota import BucketKey
from minichat.models.policy import DEFAULT_ALERTS, Alerts

AT = datetime(2026, 12, 7, 12, tzinfo=UTC)
R1, R2, R3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
DEFAULT = DEFAULT_ALERTS.thresholds_percent


def step(
    delta: int, request: uuid.UUID = R1, limit: int = 1000, thresholds: tuple[int, ...] = DEFAULT
) -> AlertStep:
    return AlertStep(delta, limit, thresholds, request, AT)


def fired(before: int, crossed: set[int], *steps: AlertStep) -> list[tuple[int, int, uuid.UUID]]:
    return [
        (c.threshold_percent, c.spent_credits_micro, c.request_id) for c in crossings(before, crossed, steps)
    ]


def test_a_jump_from_40_to_100_percent_emits_50_80_100_in_order() -> None:
    assert fired(400, set(), step(600)) == [(50, 1000, R1), (80, 1000, R1), (100, 1000, R1)]


def test_each_threshold_fires_once_in_applied_order_naming_the_crossing_turn() -> None:
    assert fired(0, set(), step(499, R1), step(1, R2), step(300, R3), step(300, R1)) == [
        (50, 500, R2),
        (80, 800, R3),
        (100, 1100, R1),
    ]


def test_falling_spend_never_re_arms_a_threshold() -> None:
    assert fired(900, {50, 80}, step(-500), step(600)) == [(100, 1000, R1)]
    assert fired(600, {50}, step(-200, R2), step(100, R3)) == []


def test_the_integer_test_is_exact() -> None:
    assert reached(500, 50, 1000) and not reached(499, 50, 1000)
    assert not reached(1, 34, 3) and reached(1, 33, 3)  # 100 < 102, 100 >= 99
    assert alert_floor(1000, (50, 80)) == 500 and alert_floor(3, (33,)) == 1


def test_a_limit_of_zero_or_no_thresholds_emits_nothing() -> None:
    assert fired(0, set(), step(10**9, limit=0)) == []
    assert fired(0, set(), step(10**9, thresholds=())) == []
    assert alert_floor(0, DEFAULT) is None and alert_floor(1000, ()) is None


def test_each_step_uses_its_own_turns_limit_and_thresholds() -> None:
    # a new policy version halves the limit: spend already past the new 50 % fires at the next turn
    assert fired(300, set(), step(100, R1, limit=1000), step(1, R2, limit=600, thresholds=(50, 90))) == [
        (50, 401, R2)
    ]


def test_a_new_window_is_a_new_row_with_nothing_crossed() -> None:
    assert fired(0, set(), step(600)) == [(50, 600, R1)]  # the next day: spent starts at 0 again


def test_batch_boundaries_do_not_change_the_answer() -> None:
    steps = [step(450, R1), step(100, R2), step(-200, R3), step(700, R1)]
    whole = crossings(0, set(), steps)
    split, spent, crossed = [], 0, set[int]()
    for s in steps:
        found = crossings(spent, crossed, [s])
        split += found
        crossed |= {c.threshold_percent for c in found}
        spent += s.spent_delta
    assert whole == split


def test_the_event_id_is_the_contracts_uuid5() -> None:
    tenant, user = uuid.uuid4(), uuid.uuid4()
    key = BucketKey("daily", date(2026, 12, 7), "tier:premium")
    name = f"alert:{tenant}:{user}:tier:premium:daily:2026-12-07:80"
    assert alert_event_id(tenant, user, key, 80) == uuid.uuid5(ID_NAMESPACE, name)


@pytest.mark.parametrize("thresholds", [(50, 50), (80, 50), (0,), (101,), (1, 2, 3, 4, 5, 6)])
def test_bad_threshold_lists_are_refused(thresholds: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Alerts(thresholds_percent=thresholds)


def test_the_default_and_an_empty_list_are_accepted() -> None:
    assert Alerts().thresholds_percent == (50, 80, 100)
    assert Alerts(thresholds_percent=()).thresholds_percent == ()


def test_a_policy_without_alerts_keeps_its_digest_and_a_tenant_override_applies() -> None:
    import json

    from minichat.models.policy import Policy, policy_digest, policy_from_snapshot, policy_snapshot_json
    from tests.unit.test_domain_turns import POLICY

    snapshot = json.loads(policy_snapshot_json(POLICY))
    assert "alerts" not in snapshot  # the default is left out: old versions keep their digest
    assert policy_from_snapshot(json.dumps(snapshot)).alerts == DEFAULT_ALERTS
    tenant = uuid.uuid4()
    data = POLICY.model_dump(mode="json")
    data["tenants"] = {str(tenant): {"alerts": {"thresholds_percent": [25]}}}
    data["alerts"] = {"thresholds_percent": [90]}
    changed = Policy.model_validate_json(json.dumps(data))
    assert changed.alert_terms(tenant)[1] == (25,)
    assert changed.alert_terms(uuid.uuid4())[1] == (90,)
    assert policy_digest(changed) != policy_digest(POLICY)
