"""Policy versions are facts: the `policy.version` record, how a rebuild merges the versions it
finds, and a recorded decision decided wholly under its own version (the pure part; the end to
end test is tests/integration/test_policy_versions.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from minichat.domain.admission import RecordedOutcome
from minichat.domain.commands import BatchState, decide_batch
from minichat.models.events import PolicyVersion
from minichat.models.policy import Policy, policy_digest
from minichat.processors.policy_versions import policy_version_record
from minichat.storage.policies import PolicyConflict
from minichat.tools.rebuild.sources import RebuildSetupError
from minichat.tools.rebuild.versions import check_recorded_versions, decode_versions, merge_versions
from tests.unit.builders import CHAT, R1, requested
from tests.unit.test_domain_admission import ALT, D_TOTAL, M_TOTAL, NOW, PREM, STD, make_policy

V1 = make_policy()
V2 = make_policy(
    PREM,
    {**STD, "tier": "premium", "default": False},
    {**ALT, "default": True},
    version=2,
    kill_switches={"disable_web_search": True},
    estimation={"minimal_generation_floor": 550},
)
RECORDED_V1 = RecordedOutcome(
    "allow", policy_version=1, effective_model="std", max_output_tokens=2048, reserve_tokens=3000,
    reserved_credits_micro=3000,
)  # fmt: skip


def decide(policy: Policy, versions: dict[int, Policy] | None) -> tuple[object, ...]:
    state = BatchState(chats={}, decisions={}, quota={}, recorded={(CHAT, R1): RECORDED_V1})
    result = decide_batch(state, [(requested(R1, web_search=True), NOW)], policy, versions)
    payload = result.answers[0].payload
    turns = result.changes.turns
    floor = turns[0].minimal_generation_floor_applied if turns else None
    keys = sorted(key[2] for key in result.changes.reserves)
    return payload["decision"], payload["error_code"], payload["policy_version"], floor, keys


def test_a_recorded_decision_is_decided_under_its_own_version() -> None:
    as_live = decide(V1, {})
    assert as_live == ("allow", None, 1, 50, sorted([D_TOTAL, M_TOTAL]))
    # the file now disables web search, floors at 550 and puts `std` on the premium tier
    assert decide(V2, {1: V1, 2: V2}) == as_live


def test_a_recorded_version_nobody_holds_is_not_guessed() -> None:
    with pytest.raises(LookupError, match="policy version 1"):
        decide(V2, {2: V2})
    with pytest.raises(RebuildSetupError, match=r"version\(s\) 1, 3"):
        check_recorded_versions({1, 2, 3}, {2: V2})
    check_recorded_versions({1, 2}, {1: V1, 2: V2})


def test_the_record_is_keyed_by_version_and_carries_the_whole_policy() -> None:
    key, value = policy_version_record(V2)
    assert key == b"2"
    record = json.loads(value)
    assert (record["type"], record["schema_version"], record["version"]) == ("policy.version", 1, 2)
    assert record["digest"] == policy_digest(V2)
    assert Policy.model_validate_json(json.dumps(record["policy"])) == V2
    assert decode_versions([(key, value)]) == [V2]


def test_a_record_that_does_not_hold_together_is_refused() -> None:
    with pytest.raises(ValidationError):
        PolicyVersion(version=2, digest=policy_digest(V1), policy=V1)
    with pytest.raises(ValidationError):
        PolicyVersion(version=1, digest="0" * 64, policy=V1)
    _, value = policy_version_record(V1)
    # a wrong key, a tombstone and a value that is not a policy.version are skipped
    assert decode_versions([(b"2", value), (b"1", None), (b"1", b"{}")]) == []


def test_merging_versions_refuses_two_contents_under_one_version() -> None:
    assert merge_versions([V1, V2, V1, make_policy()]) == {1: V1, 2: V2}
    changed = make_policy(estimation={"minimal_generation_floor": 51})
    with pytest.raises(PolicyConflict, match="policy version 1"):
        merge_versions([V1, changed])
