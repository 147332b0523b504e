"""Admission of turn.requested / retry / edit / delete / chat.delete: behaviours b17, b19-b41 and
b75-b81 (the pure part; ids defined in docs/behaviours.md), plus the contract's admission order.

Unless a test says otherwise the catalog is: `prem` (premium default, max output 8192), `std`
(standard default, 2048) and `std-alt` (standard, 1024), all at 1M/1M micro-credits per million
tokens, so one token costs one micro-credit. An empty message estimates to 110 tokens.
"""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import pytest

from minichat.domain.admission import (
    DONE,
    REPLAY,
    Admission,
    ChatFacts,
    ChatState,
    MutationResult,
    Regenerate,
    StoredTurn,
    TurnAsk,
    decide_chat_delete,
    decide_regenerate,
    decide_request,
    decide_turn_delete,
)
from minichat.domain.quota import BucketKey, QuotaRow, apply_reserve, candidate_model, tier_available
from minichat.models.bounds import MAX_TOKENS
from minichat.models.policy import Policy, load_policy
from minichat.settings import PACKAGED_POLICY

TENANT = UUID(int=1)
USER = UUID(int=2)
OTHER = UUID(int=3)
R1 = UUID(int=11)
R2 = UUID(int=12)
NOW = datetime(2026, 2, 28, 12, 0, tzinfo=UTC)
DAY = date(2026, 2, 28)
MONTH = date(2026, 2, 1)
D_TOTAL = BucketKey("daily", DAY, "total")
M_TOTAL = BucketKey("monthly", MONTH, "total")
D_PREM = BucketKey("daily", DAY, "tier:premium")
M_PREM = BucketKey("monthly", MONTH, "tier:premium")
BIG = 10**15

BASE: dict[str, Any] = load_policy(PACKAGED_POLICY).model_dump(mode="json")


def entry(
    model_id: str,
    tier: str,
    *,
    mult: int = 1_000_000,
    max_out: int = 4096,
    max_in: int = 400_000,
    enabled: bool = True,
    default: bool = False,
) -> dict[str, Any]:
    return {
        "id": model_id,
        "tier": tier,
        "enabled": enabled,
        "default": default,
        "input_tokens_credit_multiplier_micro": mult,
        "output_tokens_credit_multiplier_micro": mult,
        "max_output_tokens": max_out,
        "max_input_tokens": max_in,
        "web_search": True,
        "code_interpreter": True,
    }


PREM = entry("prem", "premium", default=True, max_out=8192)
STD = entry("std", "standard", default=True, max_out=2048)
ALT = entry("std-alt", "standard", max_out=1024)


def make_policy(
    *models: dict[str, Any],
    standard: tuple[int, int] = (BIG, BIG),
    premium: tuple[int, int] = (BIG, BIG),
    **sections: Any,
) -> Policy:
    """The example policy with this catalog and these limits; a dict section is merged into the
    example's, any other value replaces it."""
    data = copy.deepcopy(BASE)
    data["models"] = list(models or (PREM, STD, ALT))
    data["limits"] = {
        "standard": {"daily": standard[0], "monthly": standard[1]},
        "premium": {"daily": premium[0], "monthly": premium[1]},
    }
    for name, value in sections.items():
        data[name] = {**data[name], **value} if isinstance(value, dict) else value
    return Policy.model_validate(data)


POLICY = make_policy()


def request(policy: Policy = POLICY, state: ChatState | None = None, **fields: Any) -> Admission:
    fields.setdefault("content", "")
    fields.setdefault("model", "prem")
    result = decide_request(TurnAsk(TENANT, USER, **fields), state or ChatState(), policy, NOW)
    assert isinstance(result, Admission)
    return result


def summary(result: Admission) -> tuple[object, ...]:
    return (
        result.decision,
        result.effective_model,
        result.downgrade_reason,
        result.error_code,
        result.quota_scope,
    )


# --- reserve on rows (docs/behaviours.md, estimation and reserve) --------------------------------


def test_b17_forced_downgrade_applies_the_standard_max_output() -> None:
    result = request(make_policy(kill_switches={"force_standard_tier": True}))
    assert summary(result) == ("downgrade", "std", "force_standard_tier", None, None)
    assert result.downgrade_from == "prem"
    assert (result.max_output_tokens, result.reserve_tokens, result.reserved_credits_micro) == (
        2048,
        2158,
        2158,
    )


def test_b19_premium_reserves_four_rows_standard_two() -> None:
    premium = request()
    assert premium.decision == "allow" and premium.reserved_credits_micro == 110 + 8192
    assert premium.reserve_deltas == ((D_PREM, 8302), (D_TOTAL, 8302), (M_PREM, 8302), (M_TOTAL, 8302))
    standard = request(model="std")
    assert standard.reserve_deltas == ((D_TOTAL, 2158), (M_TOTAL, 2158))


def test_b20_two_reserves_on_one_key_add_up() -> None:
    rows = apply_reserve(apply_reserve({}, [(D_TOTAL, 1000)]), [(D_TOTAL, 500)])
    assert rows == {D_TOTAL: QuotaRow(reserved_credits_micro=1500)}


def test_b21_deciding_writes_nothing() -> None:
    quota = {D_TOTAL: QuotaRow(spent_credits_micro=7)}
    state = ChatState(quota=quota)
    result = request(state=state)
    assert result.accepted
    assert quota == {D_TOTAL: QuotaRow(spent_credits_micro=7)}
    assert state.quota is quota


# --- cascade and limits (docs/behaviours.md, the worked example b22-b27) --------------------------
# The worked example uses divisor 1000 (D3 in docs/behaviours.md). At the contract's divisor the same
# micro-credit figures come out of multipliers 1000 times larger, so P is 2.5e9/2.5e9 and S 1e9/1e9.

POLICY_510 = make_policy(
    entry("P", "premium", mult=2_500_000_000, max_out=500, default=True),
    entry("S", "standard", mult=1_000_000_000, max_out=500, default=True),
    standard=(60_000_000, 600_000_000),
    premium=(22_000_000, 300_000_000),
    estimation={"fixed_overhead_tokens": 0, "safety_margin_pct": 0},
    max_output_tokens_cap=500,
)
CONTENT_1000 = "x" * 4000  # 1000 estimated input tokens under POLICY_510
ROWS_510 = {
    D_PREM: QuotaRow(spent_credits_micro=20_000_000),
    M_PREM: QuotaRow(spent_credits_micro=200_000_000),
    D_TOTAL: QuotaRow(spent_credits_micro=25_000_000),
    M_TOTAL: QuotaRow(spent_credits_micro=240_000_000),
}


def test_b22_premium_reserve() -> None:
    result = request(POLICY_510, model="P", content=CONTENT_1000)
    assert summary(result) == ("allow", "P", None, None, None)
    assert (result.estimated_input_tokens, result.reserve_tokens) == (1000, 1500)
    assert result.reserved_credits_micro == 2_500_000 + 1_250_000


def test_b23_premium_daily_row_blocks_although_monthly_passes() -> None:
    limits = POLICY_510.limits
    assert not tier_available(ROWS_510, limits, [D_PREM], 3_750_000)  # 23.75M > 22M
    assert tier_available(ROWS_510, limits, [M_PREM], 3_750_000)  # 203.75M ≤ 300M


def test_b24_downgrade_recomputes_the_reserve_on_standard() -> None:
    result = request(POLICY_510, ChatState(quota=ROWS_510), model="P", content=CONTENT_1000)
    assert summary(result) == ("downgrade", "S", "premium_quota_exhausted", None, None)
    assert result.downgrade_from == "P"
    assert result.reserved_credits_micro == 1_000_000 + 500_000
    assert result.reserve_deltas == ((D_TOTAL, 1_500_000), (M_TOTAL, 1_500_000))
    rows = apply_reserve(ROWS_510, result.reserve_deltas)
    assert rows[D_TOTAL] == QuotaRow(spent_credits_micro=25_000_000, reserved_credits_micro=1_500_000)
    assert rows[M_TOTAL] == QuotaRow(spent_credits_micro=240_000_000, reserved_credits_micro=1_500_000)
    assert rows[D_PREM] == ROWS_510[D_PREM]


def test_b27_standard_is_checked_with_its_own_reserve() -> None:
    """b27 (docs/behaviours.md) describes the specification's code, which checks standard with the
    premium-priced 3.75M. The contract (rule 6) prices each tier with its candidate model:
    57M + 1.5M ≤ 60M passes, where 57M + 3.75M would not."""
    rows = {**ROWS_510, D_TOTAL: QuotaRow(spent_credits_micro=57_000_000)}
    result = request(POLICY_510, ChatState(quota=rows), model="P", content=CONTENT_1000)
    assert summary(result) == ("downgrade", "S", "premium_quota_exhausted", None, None)
    assert result.reserved_credits_micro == 1_500_000


@pytest.mark.parametrize(
    ("spent", "reserved", "decision"),
    [
        pytest.param(10_000 - 2158, 0, "allow", id="b28-exactly-fills"),
        pytest.param(10_000 - 2158 - 100, 100, "allow", id="b28-reserved-counts-too"),
        pytest.param(10_000 - 2158 + 1, 0, "reject", id="b28-one-over"),
    ],
)
def test_b28_limit_is_inclusive(spent: int, reserved: int, decision: str) -> None:
    rows = {D_TOTAL: QuotaRow(spent_credits_micro=spent, reserved_credits_micro=reserved)}
    result = request(make_policy(standard=(10_000, BIG)), ChatState(quota=rows), model="std")
    assert result.decision == decision


@pytest.mark.parametrize(
    ("policy", "model", "expected"),
    [
        pytest.param(
            make_policy(premium=(0, BIG)),
            "prem",
            ("downgrade", "std", "premium_quota_exhausted", None, None),
            id="b29-premium-limit-zero",
        ),
        pytest.param(
            make_policy(standard=(0, BIG), premium=(0, BIG)),
            "prem",
            ("reject", None, None, "quota_exceeded", "tokens"),
            id="b30-both-limits-zero",
        ),
        pytest.param(
            make_policy(premium=(0, 0)),
            "std",
            ("allow", "std", None, None, None),
            id="b31-standard-never-reads-premium",
        ),
        pytest.param(
            make_policy(kill_switches={"disable_premium_tier": True}),
            "prem",
            ("downgrade", "std", "disable_premium_tier", None, None),
            id="b32-disable-premium-tier",
        ),
        pytest.param(
            make_policy(kill_switches={"disable_premium_tier": True, "force_standard_tier": True}),
            "prem",
            ("downgrade", "std", "force_standard_tier", None, None),
            id="b33-force-standard-checked-first",
        ),
        pytest.param(
            make_policy({**PREM, "enabled": False}, STD, ALT),
            "prem",
            ("downgrade", "std", "model_disabled", None, None),
            id="b34-disabled-premium-model",
        ),
        pytest.param(
            make_policy(ALT, STD),
            "std-alt",
            ("allow", "std-alt", None, None, None),
            id="b36-selected-non-default-kept",
        ),
        pytest.param(
            make_policy({**PREM, "enabled": False}, {**STD, "enabled": False}, {**ALT, "enabled": False}),
            "prem",
            ("reject", None, None, "quota_exceeded", "tokens"),
            id="b37-every-model-disabled",
        ),
        pytest.param(
            make_policy(STD, ALT),
            "retired-model",
            ("downgrade", "std", "model_disabled", None, None),
            id="b38-tier-without-enabled-model-skipped",
        ),
        pytest.param(
            make_policy(standard=(0, BIG), kill_switches={"disable_web_search": True}),
            "prem",
            ("reject", None, None, "web_search_disabled", None),
            id="b39-web-search-disabled-before-quota",
        ),
    ],
)
def test_cascade(policy: Policy, model: str, expected: tuple[object, ...]) -> None:
    web_search = expected[3] == "web_search_disabled"
    assert summary(request(policy, model=model, web_search=web_search)) == expected


def test_b31_premium_rows_over_limit_do_not_matter_to_standard() -> None:
    rows = {D_PREM: QuotaRow(spent_credits_micro=BIG), M_PREM: QuotaRow(spent_credits_micro=BIG)}
    result = request(state=ChatState(quota=rows), model="std")
    assert result.decision == "allow"
    assert [key for key, _ in result.reserve_deltas] == [D_TOTAL, M_TOTAL]


def test_b34_contract_disabled_model_starts_at_premium_default() -> None:
    """Contract rule 6: a disabled model starts at premium and takes the tier's enabled default."""
    policy = make_policy(
        {**PREM, "enabled": False, "default": False}, entry("prem-2", "premium", default=True), STD
    )
    result = request(policy)
    assert summary(result) == ("downgrade", "prem-2", "model_disabled", None, None)
    assert len(result.reserve_deltas) == 4


def test_b35_contract_disabled_standard_model_starts_at_premium() -> None:
    """b35 says a disabled standard model never escalates. The contract (rule 6: "unknown or
    disabled model → premium start, reason model_disabled") decides otherwise: it goes to the
    premium default while premium has room, and is rejected only when premium is full too."""
    catalog = (PREM, {**STD, "enabled": False}, {**ALT, "enabled": False})
    assert summary(request(make_policy(*catalog), model="std")) == (
        "downgrade",
        "prem",
        "model_disabled",
        None,
        None,
    )
    assert summary(request(make_policy(*catalog, premium=(0, BIG)), model="std")) == (
        "reject",
        None,
        None,
        "quota_exceeded",
        "tokens",
    )


def test_b38_candidate_model_none_for_tier_without_enabled_model() -> None:
    policy = make_policy({**PREM, "enabled": False}, STD, ALT)
    assert candidate_model(policy, "premium", "prem") is None
    model = candidate_model(policy, "standard", "prem")
    assert model is not None and model.id == "std"


@pytest.mark.parametrize(
    ("counters", "asks", "expected"),
    [
        pytest.param(
            QuotaRow(web_search_calls=75), {"web_search": True}, "web_search", id="b40-web-search-quota"
        ),
        pytest.param(QuotaRow(web_search_calls=74), {"web_search": True}, None, id="b40-below-quota"),
        pytest.param(QuotaRow(web_search_calls=75), {}, None, id="b40-contract-not-asked"),
        pytest.param(
            QuotaRow(code_interpreter_calls=50),
            {"code_interpreter": True},
            "code_interpreter",
            id="b41-code-quota",
        ),
        pytest.param(
            QuotaRow(web_search_calls=75, code_interpreter_calls=50),
            {"web_search": True, "code_interpreter": True},
            "web_search",
            id="web-search-checked-first",
        ),
    ],
)
def test_daily_tool_quota(counters: QuotaRow, asks: dict[str, Any], expected: str | None) -> None:
    """b40/b41 (docs/behaviours.md): the specification's code gates the daily tool quota on the
    model's capability, even for a request that did not ask for the tool; the contract (rule 7)
    gates it on the request."""
    result = request(state=ChatState(quota={D_TOTAL: counters}), **asks)
    if expected is None:
        assert result.decision == "allow"
    else:
        assert (result.decision, result.error_code, result.quota_scope) == (
            "reject",
            "quota_exceeded",
            expected,
        )


def test_tool_counters_of_another_day_do_not_count() -> None:
    yesterday = BucketKey("daily", date(2026, 2, 27), "total")
    result = request(state=ChatState(quota={yesterday: QuotaRow(web_search_calls=75)}), web_search=True)
    assert result.decision == "allow"


def test_token_quota_is_decided_before_tool_quota() -> None:
    rows = {D_TOTAL: QuotaRow(web_search_calls=75)}
    result = request(make_policy(standard=(0, BIG)), ChatState(quota=rows), web_search=True)
    assert (result.error_code, result.quota_scope) == ("quota_exceeded", "tokens")


def test_code_interpreter_kill_switch_drops_the_tool() -> None:
    policy = make_policy(kill_switches={"disable_code_interpreter": True})
    rows = {D_TOTAL: QuotaRow(code_interpreter_calls=50)}
    result = request(policy, ChatState(quota=rows), code_interpreter=True)
    assert result.decision == "allow"
    assert (result.code_interpreter, result.estimated_input_tokens) == (False, 110)


# --- admission order (docs/contract.md, "Admission", rules 1-5) ----------------------------------


@pytest.mark.parametrize(
    ("state", "fields", "expected"),
    [
        pytest.param(ChatState(chat=ChatFacts(OTHER, USER, "prem")), {}, "chat_not_found", id="other-tenant"),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, OTHER, "prem")), {}, "chat_not_found", id="other-owner"
        ),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, USER, "prem", deleted=True)), {}, "chat_not_found", id="deleted"
        ),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, OTHER, "prem"), already_decided=True),
            {},
            "chat_not_found",
            id="hidden-before-replay",
        ),
        pytest.param(
            ChatState(already_decided=True, turn_running=True), {}, "replay", id="replay-before-running"
        ),
        pytest.param(ChatState(already_decided=True), {"model": None}, "replay", id="replay-of-a-reject"),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, USER, "prem"), turn_running=True),
            {"image_count": 9},
            "generation_in_progress",
            id="running-before-validation",
        ),
        pytest.param(ChatState(), {"model": None}, "model_required", id="new-chat-needs-a-model"),
        pytest.param(ChatState(), {"model": ""}, "model_required", id="empty-model"),
        pytest.param(
            ChatState(),
            {"image_count": 5, "model": "prem"},
            "too_many_images",
            id="too-many-images-before-disabled",
        ),
        pytest.param(
            ChatState(), {"image_count": 1, "web_search": True}, "images_disabled", id="images-disabled"
        ),
    ],
)
def test_admission_order(state: ChatState, fields: dict[str, Any], expected: str) -> None:
    policy = make_policy(kill_switches={"disable_images": True, "disable_web_search": True})
    result = decide_request(TurnAsk(TENANT, USER, "", **{"model": "prem", **fields}), state, policy, NOW)
    assert (
        (result is REPLAY)
        if expected == "replay"
        else (isinstance(result, Admission) and result.error_code == expected)
    )


def test_hidden_chat_reveals_nothing() -> None:
    result = request(state=ChatState(chat=ChatFacts(OTHER, OTHER, "secret-model")), model="std")
    assert (result.decision, result.error_code, result.selected_model) == ("reject", "chat_not_found", "std")
    assert result.reserve_deltas == ()


def test_existing_chat_keeps_its_model() -> None:
    result = request(state=ChatState(chat=ChatFacts(TENANT, USER, "std")), model="prem")
    assert (result.decision, result.selected_model, result.effective_model) == ("allow", "std", "std")
    result = request(state=ChatState(chat=ChatFacts(TENANT, USER, "std")), model=None)
    assert result.effective_model == "std"


@pytest.mark.parametrize(
    ("content", "previous", "expected"),
    [
        pytest.param("x" * 3276, 0, None, id="text-estimate-at-limit"),  # ceil((819+100)·1.1) = 1011
        pytest.param("x" * 3284, 0, "input_too_long", id="text-estimate-over-limit"),  # ceil(921·1.1) = 1014
        pytest.param("", 50_000, None, id="previous-turn-not-counted"),
        pytest.param("", MAX_TOKENS, "input_too_long", id="estimate-beyond-arithmetic-bound"),
    ],
)
def test_input_too_long(content: str, previous: int, expected: str | None) -> None:
    policy = make_policy({**PREM, "max_input_tokens": 1011}, STD)
    result = request(policy, ChatState(previous_turn_tokens=previous), content=content)
    assert result.error_code == expected


def test_accepted_decision_carries_what_the_writer_stores() -> None:
    result = request(content="héllo", image_count=2, web_search=True)
    # 6 bytes → ceil(6/4)=2; ceil(102·1.1)=113; + 2 images + web search surcharge
    assert result.estimated_input_tokens == 113 + 2000 + 500
    assert result.periods.daily == DAY and result.periods.monthly == MONTH
    assert (result.policy_version, result.minimal_generation_floor_applied) == (1, 50)
    assert (result.content, result.image_count, result.web_search, result.code_interpreter) == (
        "héllo",
        2,
        True,
        False,
    )
    assert (result.downgrade_from, result.downgrade_reason, result.error_code, result.quota_scope) == (
        None,
    ) * 4


def test_two_requests_of_one_user_in_a_batch_see_each_other() -> None:
    policy = make_policy(standard=(3000, BIG))
    first = request(policy, model="std")
    assert first.accepted
    quota = apply_reserve({}, first.reserve_deltas)
    second = request(policy, ChatState(quota=quota), model="std")
    assert (second.decision, second.error_code) == ("reject", "quota_exceeded")


# --- retry, edit, delete, chat.delete (docs/behaviours.md, mutations) -----------------------------

OLD = StoredTurn(R1, USER, "completed", content="hello", image_count=1, web_search=True)
CHAT = ChatFacts(TENANT, USER, "prem")
MUTABLE = ChatState(chat=CHAT, target_turn=OLD, latest_live_request_id=R1)


def regenerate(state: ChatState = MUTABLE, content: str | None = None, policy: Policy = POLICY) -> Admission:
    result = decide_regenerate(Regenerate(TENANT, USER, R1, content), state, policy, NOW)
    assert isinstance(result, Admission)
    return result


def test_b75_b77_retry_resends_the_old_turn() -> None:
    result = regenerate()
    assert (result.decision, result.selected_model, result.effective_model) == ("allow", "prem", "prem")
    assert (result.content, result.image_count, result.web_search) == ("hello", 1, True)
    # 5 bytes → 2 tokens; ceil(102·1.1) = 113; + 1 image + web search
    assert result.estimated_input_tokens == 113 + 1000 + 500


def test_b76_edit_uses_the_new_content() -> None:
    result = regenerate(content="new words")
    assert (result.decision, result.content, result.web_search) == ("allow", "new words", True)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param(ChatState(), "chat_not_found", id="no-chat"),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, OTHER, "prem"), target_turn=OLD), "chat_not_found", id="owner"
        ),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, USER, "prem", deleted=True)), "chat_not_found", id="deleted"
        ),
        pytest.param(ChatState(chat=CHAT), "turn_not_found", id="turn-not-found"),
        pytest.param(
            ChatState(chat=CHAT, target_turn=StoredTurn(R1, OTHER, "running"), latest_live_request_id=R2),
            "forbidden",
            id="b79-forbidden-first",
        ),
        pytest.param(
            ChatState(chat=CHAT, target_turn=StoredTurn(R1, USER, "running"), latest_live_request_id=R2),
            "invalid_turn_state",
            id="b78-running-before-not-latest",
        ),
        pytest.param(
            ChatState(chat=CHAT, target_turn=OLD, latest_live_request_id=R2),
            "not_latest_turn",
            id="b80-older-turn",
        ),
        pytest.param(
            ChatState(
                chat=CHAT, target_turn=StoredTurn(R1, USER, "failed", deleted=True), latest_live_request_id=R2
            ),
            "not_latest_turn",
            id="b81-deleted-turn",
        ),
        pytest.param(ChatState(chat=CHAT, target_turn=OLD), "not_latest_turn", id="no-live-turn"),
    ],
)
def test_mutation_validation(state: ChatState, expected: str) -> None:
    """Codes are the contract's; their order is the specification's (M2 in docs/behaviours.md)."""
    assert regenerate(state).error_code == expected
    assert decide_turn_delete(TENANT, USER, R1, state) == MutationResult("reject", expected)


@pytest.mark.parametrize("turn_state", ["completed", "failed", "cancelled"])
def test_any_terminal_latest_turn_can_be_mutated(turn_state: str) -> None:
    turn = StoredTurn(R1, USER, turn_state)  # type: ignore[arg-type]
    state = ChatState(chat=CHAT, target_turn=turn, latest_live_request_id=R1)
    assert regenerate(state).accepted
    assert decide_turn_delete(TENANT, USER, R1, state) == DONE


def test_mutation_replay() -> None:
    state = ChatState(chat=CHAT, already_decided=True)
    assert decide_regenerate(Regenerate(TENANT, USER, R1), state, POLICY, NOW) is REPLAY
    assert decide_turn_delete(TENANT, USER, R1, state) is REPLAY


def test_retry_goes_through_the_quota_decision() -> None:
    result = regenerate(policy=make_policy(standard=(0, BIG)))
    assert (result.decision, result.error_code, result.quota_scope) == ("reject", "quota_exceeded", "tokens")
    result = regenerate(policy=make_policy(kill_switches={"disable_web_search": True}))
    assert result.error_code == "web_search_disabled"
    result = regenerate(policy=make_policy(premium=(0, BIG)))
    assert (result.decision, result.effective_model, result.reserve_deltas[0][0]) == (
        "downgrade",
        "std",
        D_TOTAL,
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param(ChatState(chat=CHAT), DONE, id="done"),
        pytest.param(ChatState(chat=CHAT, already_decided=True), REPLAY, id="replay"),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, USER, "prem", deleted=True), already_decided=True),
            REPLAY,
            id="dup",
        ),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, USER, "prem", deleted=True)),
            MutationResult("reject", "chat_not_found"),
            id="already-deleted",
        ),
        pytest.param(ChatState(), MutationResult("reject", "chat_not_found"), id="unknown"),
        pytest.param(
            ChatState(chat=ChatFacts(OTHER, USER, "prem"), already_decided=True),
            MutationResult("reject", "chat_not_found"),
            id="other-tenant",
        ),
        pytest.param(
            ChatState(chat=ChatFacts(TENANT, OTHER, "prem")),
            MutationResult("reject", "chat_not_found"),
            id="other-owner",
        ),
    ],
)
def test_chat_delete(state: ChatState, expected: object) -> None:
    assert decide_chat_delete(TENANT, USER, state) == expected


# --- a rebuild applies recorded quota outcomes ---------------------------------------------------


def test_a_recorded_acceptance_is_applied_although_the_rebuilt_rows_are_full() -> None:
    from minichat.domain.admission import RecordedOutcome

    full = {k: QuotaRow(spent_credits_micro=BIG) for k in (D_TOTAL, M_TOTAL, D_PREM, M_PREM)}
    assert request(state=ChatState(quota=full)).error_code == "quota_exceeded"
    recorded = RecordedOutcome(
        "downgrade",
        policy_version=3,
        effective_model="std",
        downgrade_from="prem",
        downgrade_reason="premium_quota_exhausted",
        max_output_tokens=2048,
        reserve_tokens=2158,
        reserved_credits_micro=2158,
    )
    result = request(state=ChatState(quota=full, recorded=recorded), content="hi")
    assert summary(result) == ("downgrade", "std", "premium_quota_exhausted", None, None)
    assert (result.policy_version, result.reserve_tokens, result.reserved_credits_micro) == (3, 2158, 2158)
    assert result.content == "hi"
    assert result.reserve_deltas == ((D_TOTAL, 2158), (M_TOTAL, 2158))


def test_a_recorded_rejection_stays_a_rejection_and_chat_rules_still_run_first() -> None:
    from minichat.domain.admission import RecordedOutcome

    recorded = RecordedOutcome(
        "reject", policy_version=1, error_code="quota_exceeded", quota_scope="web_search"
    )
    assert summary(request(state=ChatState(recorded=recorded))) == (
        "reject", None, None, "quota_exceeded", "web_search"
    )  # fmt: skip
    running = ChatState(
        chat=ChatFacts(TENANT, USER, "prem"),
        turn_running=True,
        recorded=RecordedOutcome("allow", policy_version=1),
    )
    assert request(state=running).error_code == "generation_in_progress"
