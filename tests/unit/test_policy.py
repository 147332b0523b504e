"""The policy file: loading, validation errors that name the field, snapshot, tenant overrides."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from minichat.models.policy import (
    Policy,
    PolicyError,
    load_policy,
    policy_digest,
    policy_from_snapshot,
    policy_snapshot_json,
)
from minichat.settings import PACKAGED_POLICY

TENANT = UUID("3f0c8a52-5f2d-4a57-9d8e-0a6f5c1b7e21")
EXAMPLE: dict[str, Any] = yaml.safe_load(PACKAGED_POLICY.read_text(encoding="utf-8"))


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def edited(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE)
    edit(data)
    return data


def test_packaged_example_loads() -> None:
    policy = load_policy(PACKAGED_POLICY)
    assert policy.version == 1
    assert [m.id for m in policy.models] == ["gpt-5.2", "gpt-5-mini", "gpt-5-nano"]
    mini = policy.model_by_id("gpt-5-mini")
    assert mini is not None and mini.tier == "standard" and mini.default
    assert policy.model_by_id("nope") is None
    assert policy.limits.standard.daily == 100_000_000
    assert policy.overshoot_tolerance == 1.10
    assert policy.tenants == {}


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _duplicate_id(data: dict[str, Any]) -> None:
    data["models"][2]["id"] = "gpt-5-mini"


def _second_default(data: dict[str, Any]) -> None:
    data["models"][2]["default"] = True


def _unknown_tenant_key(data: dict[str, Any]) -> None:
    data["tenants"] = {str(TENANT): {"limits": {"standard": {"daily": 1, "montly": 2}}}}


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        pytest.param(
            _set("models.1.max_output_tokens", "lots"), "models.1.max_output_tokens", id="wrong-type"
        ),
        pytest.param(_set("models.0.enabled", "yes"), "models.0.enabled", id="string-for-bool"),
        pytest.param(_set("limits.standard.daily", 1.5), "limits.standard.daily", id="float-limit"),
        pytest.param(_set("limits.premium.monthly", -1), "limits.premium.monthly", id="negative-limit"),
        pytest.param(
            _set("estimation.safty_margin_pct", 10), "estimation.safty_margin_pct", id="unknown-key"
        ),
        pytest.param(_set("kill_switch", {}), "kill_switch", id="unknown-top-key"),
        pytest.param(
            _set("models.0.input_tokens_credit_multiplier_micro", 0),
            "models.0.input_tokens_credit_multiplier_micro",
            id="zero-multiplier",
        ),
        pytest.param(
            _set("models.2.output_tokens_credit_multiplier_micro", 10_000_000_001),
            "models.2.output_tokens_credit_multiplier_micro",
            id="multiplier-too-big",
        ),
        pytest.param(
            _set("models.1.max_input_tokens", 10_000_001), "models.1.max_input_tokens", id="token-bound"
        ),
        pytest.param(_set("models.1.tier", "gold"), "models.1.tier", id="bad-tier"),
        pytest.param(_duplicate_id, "models.2.id", id="duplicate-id"),
        pytest.param(_second_default, "models.2.default", id="two-defaults-in-tier"),
        pytest.param(_set("overshoot_tolerance", 0.9), "overshoot_tolerance", id="tolerance-below-1"),
        pytest.param(_set("usage_grace_s", 0), "usage_grace_s", id="zero-timeout"),
        pytest.param(_set("tenants", {"not-a-uuid": {}}), "tenants.not-a-uuid.[key]", id="tenant-not-uuid"),
        pytest.param(_unknown_tenant_key, f"tenants.{TENANT}.limits.standard.montly", id="tenant-typo"),
        pytest.param(lambda d: d.pop("tools"), "tools", id="missing-section"),
    ],
)
def test_bad_file_names_file_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    path = write(tmp_path, edited(edit))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"{field}:" in message
    assert field in [f for f, _ in caught.value.problems]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("version: 1\nversion: 2\n", id="duplicate-yaml-key"),
        pytest.param("version: [1\n", id="not-yaml"),
        pytest.param("- 1\n- 2\n", id="not-a-mapping"),
    ],
)
def test_unparseable_file_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError, match=str(path)):
        load_policy(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"absent\.yaml"):
        load_policy(tmp_path / "absent.yaml")


def test_policy_is_frozen() -> None:
    policy = load_policy(PACKAGED_POLICY)
    with pytest.raises(ValueError, match="frozen"):
        policy.version = 2  # type: ignore[misc]


def test_snapshot_is_canonical_and_round_trips(tmp_path: Path) -> None:
    policy = load_policy(PACKAGED_POLICY)
    snapshot = policy_snapshot_json(policy)
    assert snapshot.startswith('{"estimation":{"bytes_per_token":4,')
    assert " " not in snapshot.replace("gpt-5", "")
    # Key order, comments and defaulted keys written out do not change the snapshot.
    reordered = dict(reversed(list(EXAMPLE.items())))
    reordered["kill_switches"] = {}
    assert policy_snapshot_json(load_policy(write(tmp_path, reordered))) == snapshot
    restored = policy_from_snapshot(snapshot)
    assert restored == policy
    assert policy_digest(restored) == policy_digest(policy)
    assert len(policy_digest(policy)) == 64


def test_digest_changes_with_content() -> None:
    policy = load_policy(PACKAGED_POLICY)
    other = Policy.model_validate(edited(_set("max_images", 5)))
    assert other.version == policy.version
    assert policy_digest(other) != policy_digest(policy)


def test_tenant_override_is_partial() -> None:
    data = edited(
        _set(
            "tenants",
            {str(TENANT): {"limits": {"standard": {"daily": 5_000_000}, "premium": {"monthly": 0}}}},
        )
    )
    policy = Policy.model_validate(data)
    limits = policy.limits_for(TENANT)
    assert (limits.standard.daily, limits.standard.monthly) == (5_000_000, 1_000_000_000)
    assert (limits.premium.daily, limits.premium.monthly) == (50_000_000, 0)
    other = policy.limits_for(UUID(int=1))
    assert other == policy.limits
