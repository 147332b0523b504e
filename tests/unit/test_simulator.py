"""The simulator's plan (deterministic, complete, contract-valid) and the summary's arithmetic and tables."""

from __future__ import annotations

import io
import random
import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest
import yaml

from minichat.domain.admission import Admission, ChatState, TurnAsk, decide_request
from minichat.domain.quota import QuotaRow, apply_deltas, apply_reserve
from minichat.domain.settlement import RELEASED_CODES, TurnCharge, UsageFigures, settle, settlement_deltas
from minichat.models import events
from minichat.models.policy import Policy, load_policy
from minichat.models.topics import PROVIDER_RESPONSES, USAGE
from minichat.settings import PACKAGED_POLICY
from minichat.tools.progress import Progress
from minichat.tools.simulator import (
    DEMO_POLICY,
    DEMO_TENANT_ID,
    FAILURE_CODES,
    LIMIT_CHATS,
    LIMIT_TURNS,
    MIN_TURNS_FOR_COVERAGE,
    OVERSHOOT_INPUT_TOKENS,
    SCENARIO_KINDS,
    DeleteStep,
    Outcome,
    Plan,
    TokenPlan,
    TurnStep,
    make_plan,
    provider_script,
    turn_command,
)
from minichat.tools.summary import SpendLine, SpendReport, Summary, build_summary, render
from minichat.tools.tables import format_credits, format_table

SMALL = {"tenants": 2, "users_per_tenant": 2, "chats_per_user": 2, "turns_per_chat": 3}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(DEMO_POLICY)


def kinds(plan: Plan) -> set[str]:
    return {kind for kind, n in plan.scenario_counts().items() if n > 0}


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


def test_plan_is_deterministic_for_a_seed(policy: Policy) -> None:
    assert make_plan(policy, seed=42) == make_plan(policy, seed=42)
    assert make_plan(policy, seed=42, **SMALL) == make_plan(policy, seed=42, **SMALL)
    assert make_plan(policy, seed=42) != make_plan(policy, seed=43)


@pytest.mark.parametrize("sizes", [{}, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("seed", range(25))
def test_plan_covers_every_scenario_kind(policy: Policy, sizes: dict[str, int], seed: int) -> None:
    plan = make_plan(policy, seed=seed, **sizes)
    assert kinds(plan) >= SCENARIO_KINDS, SCENARIO_KINDS - kinds(plan)


def test_scenario_kinds_name_every_failure_code_and_usage_path() -> None:
    assert {f"failed:{code}" for code in FAILURE_CODES} <= SCENARIO_KINDS
    assert len(FAILURE_CODES) == 9  # the 8 codes of the settlement table and one unknown
    assert {f"completed/{mode}" for mode in ("inline", "after", "before", "none", "late")} <= SCENARIO_KINDS
    assert {"cancelled/text", "cancelled/empty", "early", "duplicate-command", "duplicate-terminal"} <= (
        SCENARIO_KINDS
    )
    assert {"duplicate-usage", "turn.retry", "turn.edit", "turn.delete", "limit-user"} <= SCENARIO_KINDS


def test_a_plan_below_the_coverage_size_still_plays(policy: Policy) -> None:
    plan = make_plan(policy, seed=1, tenants=1, users_per_tenant=1, chats_per_user=1, turns_per_chat=2)
    chat, *limits = plan.chats
    requested = [s for s in chat.steps if isinstance(s, TurnStep) and s.command == "turn.requested"]
    assert len(requested) == 2 < MIN_TURNS_FOR_COVERAGE
    assert isinstance(chat.steps[0], TurnStep) and chat.steps[0].command == "turn.requested"
    assert len(limits) == LIMIT_CHATS and all(c.limit for c in limits) and not chat.limit


def test_plan_shape(policy: Policy) -> None:
    plan = make_plan(policy, seed=3)
    regular = [c for c in plan.chats if not c.limit]
    assert len(regular) == 4 * 5 * 3
    assert {(c.tenant, c.user, c.chat) for c in regular} == {
        (t, u, c) for t in range(4) for u in range(5) for c in range(3)
    }
    assert {c.tier for c in regular} == {"premium", "standard"}
    catalog = {m.id: m for m in policy.models}
    for chat in regular:
        assert catalog[chat.model].enabled and catalog[chat.model].tier == chat.tier
        requested = [s for s in chat.steps if isinstance(s, TurnStep) and s.command == "turn.requested"]
        assert len(requested) == 4
        assert isinstance(chat.steps[0], TurnStep) and chat.steps[0].command == "turn.requested"
        for before, step in zip(chat.steps, chat.steps[1:], strict=False):
            if isinstance(step, DeleteStep) or step.command != "turn.requested":
                # A mutation always follows a turn of the chat (the latest one).
                assert isinstance(before, TurnStep) and before.command == "turn.requested"
    limits = [c for c in plan.chats if c.limit]
    assert [c.chat for c in limits] == list(range(LIMIT_CHATS))  # one user's chats, played at once
    for limit in limits:
        assert (limit.tenant, limit.user) == (plan.demo_tenant, 0)
        assert catalog[limit.model].tier == "premium"
        assert len(limit.steps) == LIMIT_TURNS


def test_token_counts_are_realistic(policy: Policy) -> None:
    plan = make_plan(policy, seed=5)
    catalog = {m.id: m for m in policy.models}
    for chat in plan.chats:
        if chat.limit:
            continue
        for step in chat.steps:
            if isinstance(step, DeleteStep):
                continue
            t = step.tokens
            if step.outcome.error_code in RELEASED_CODES:
                assert (t.input_tokens, t.output_tokens) == (0, 0)
                assert step.progress == 0
            elif "overshoot" in step.flags:
                # Far above any reserve, but not above what the model accepts.
                model = catalog[chat.model]
                assert t.input_tokens == min(OVERSHOOT_INPUT_TOKENS, model.max_input_tokens)
                assert t.input_tokens > 2 * (6000 + model.max_output_tokens)
            else:
                assert 300 <= t.input_tokens <= 6000
            assert 0 <= t.output_tokens <= catalog[chat.model].max_output_tokens
            assert t.cache_read_input_tokens <= t.input_tokens
            assert t.reasoning_tokens <= t.output_tokens


def test_plan_never_asks_for_what_the_policy_switched_off(policy: Policy) -> None:
    switched = policy.model_copy(
        update={"kill_switches": policy.kill_switches.model_copy(update={"disable_web_search": True})}
    )
    plan = make_plan(switched, seed=9)
    assert not any(s.web_search for c in plan.chats for s in c.steps if isinstance(s, TurnStep))


def test_flags_sit_on_turns_that_can_play_them(policy: Policy) -> None:
    for seed in range(10):
        for chat in make_plan(policy, seed=seed).chats:
            for step in chat.steps:
                if not isinstance(step, TurnStep):
                    continue
                if "overshoot" in step.flags:
                    assert step.outcome == Outcome("completed", "inline")
                if "duplicate-usage" in step.flags:
                    assert step.outcome.usage in ("after", "before", "late")


# --------------------------------------------------------------------------------------------
# Events: every record the simulator produces passes the processor's own decoder
# --------------------------------------------------------------------------------------------


def decode(topic: str, chat: uuid.UUID, value: bytes) -> Any:
    return events.decode(topic, str(chat).encode(), value)  # type: ignore[arg-type]


def test_every_planned_event_is_a_valid_contract_event(policy: Policy) -> None:
    plan = make_plan(policy, seed=11, **SMALL)
    rng = random.Random(0)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    for chat in plan.chats:
        chat_id = uuid.uuid4()
        latest: uuid.UUID | None = None
        for i, step in enumerate(chat.steps):
            if isinstance(step, DeleteStep):
                continue
            request_id = uuid.uuid4()
            command = turn_command(
                chat,
                step,
                tenant=tenant,
                user=user,
                chat_id=chat_id,
                request_id=request_id,
                latest=latest,
                chat_exists=i > 0,
            )
            decoded = decode("turn-requests", chat_id, events.to_json_bytes(command))
            assert decoded == command
            if i == 0:
                assert decoded.model == chat.model  # required when the chat is new
            script = provider_script(
                step,
                tenant=tenant,
                chat=chat_id,
                request_id=request_id,
                effective_model=chat.model,
                max_output_tokens=1000,
                rng=rng,
            )
            for record in (*script.records, *script.late):
                event = decode(record.topic, chat_id, record.value)
                assert event.request_id == request_id and event.tenant_id == tenant
                assert record.topic == (USAGE if event.type.startswith("usage.") else PROVIDER_RESPONSES)
                usage = getattr(event, "usage", None) or (event if event.type == "usage.reported" else None)
                if usage is not None:
                    assert usage.output_tokens <= 1000  # capped at the decision's max output
            latest = request_id


def step_with(outcome: Outcome, *flags: str, progress: int = 2) -> TurnStep:
    return TurnStep(
        command="turn.requested",
        content="hello",
        outcome=outcome,
        tokens=TokenPlan(1200, 300),
        progress=progress,
        reply_words=10,
        flags=frozenset(flags),  # type: ignore[arg-type]
    )


def script_types(step: TurnStep) -> tuple[list[str], list[str], list[bytes]]:
    script = provider_script(
        step,
        tenant=uuid.uuid4(),
        chat=uuid.uuid4(),
        request_id=uuid.uuid4(),
        effective_model="gpt-5-mini",
        max_output_tokens=16384,
        rng=random.Random(1),
    )
    kinds = [r.kind for r in script.records]
    return kinds, [r.kind for r in script.late], [r.value for r in script.records]


def test_script_orders_usage_as_planned() -> None:
    inline, _, values = script_types(step_with(Outcome("completed", "inline")))
    assert inline == ["turn.progress", "turn.progress", "turn.completed"]
    assert b'"input_tokens":1200' in values[-1]

    assert script_types(step_with(Outcome("completed", "after")))[0][-2:] == [
        "turn.completed",
        "usage.reported",
    ]
    before = script_types(step_with(Outcome("completed", "before")))[0]
    assert before.index("usage.reported") < before.index("turn.completed")
    none, late_none, values = script_types(step_with(Outcome("completed", "none")))
    assert "usage.reported" not in none and not late_none and b'"usage":null' in values[-1]
    late, late_records, _ = script_types(step_with(Outcome("completed", "late")))
    assert "usage.reported" not in late and late_records == ["usage.reported"]


def test_script_duplicates_are_the_same_bytes_and_a_second_terminal_differs() -> None:
    kinds, _, values = script_types(
        step_with(Outcome("completed", "after"), "duplicate-terminal", "duplicate-usage", "second-terminal")
    )
    assert kinds == [
        "turn.progress",
        "turn.progress",
        "turn.completed",
        "turn.completed",
        "turn.cancelled",
        "usage.reported",
        "usage.reported",
    ]
    assert values[2] == values[3] and values[5] == values[6]


def test_released_failures_and_cancellations() -> None:
    kinds, _, values = script_types(step_with(Outcome("failed", "none", "provider_not_called"), progress=0))
    assert kinds == ["turn.failed"] and b'"error_code":"provider_not_called"' in values[0]
    _, _, values = script_types(step_with(Outcome("cancelled", "none", partial_text=False)))
    assert b'"content":""' in values[-1]
    _, _, values = script_types(step_with(Outcome("cancelled", "inline", partial_text=True)))
    assert b'"content":""' not in values[-1]


# --------------------------------------------------------------------------------------------
# The demo policy and its limit user
# --------------------------------------------------------------------------------------------


def test_demo_policy_is_the_example_plus_the_demo_tenant() -> None:
    demo = yaml.safe_load(DEMO_POLICY.read_text())
    example = yaml.safe_load(PACKAGED_POLICY.read_text())
    assert demo["version"] == 2 != example["version"]
    assert (demo["usage_grace_s"], demo["watchdog_interval_s"]) == (3, 1)
    changed = {"version", "tenants", "usage_grace_s", "watchdog_interval_s"}
    assert {k: v for k, v in demo.items() if k not in changed} == {
        k: v for k, v in example.items() if k not in changed
    }
    assert list(load_policy(DEMO_POLICY).tenants) == [DEMO_TENANT_ID]


def test_limit_user_is_downgraded_then_refused_under_the_demo_policy(policy: Policy) -> None:
    """Replays the limit chat with the domain functions, as the processor decides and settles it
    (each turn completes with inline usage, the output capped at the decision's max output)."""
    chat = next(c for c in make_plan(policy, seed=0, **SMALL).chats if c.limit)
    rows: dict[Any, QuotaRow] = {}
    previous = 0
    now = datetime(2026, 5, 10, 12, tzinfo=UTC)
    seen: list[tuple[str, str | None, str | None]] = []
    for step in chat.steps:
        assert isinstance(step, TurnStep)
        ask = TurnAsk(DEMO_TENANT_ID, uuid.uuid4(), step.content, chat.model)
        admission = decide_request(ask, ChatState(quota=rows, previous_turn_tokens=previous), policy, now)
        assert isinstance(admission, Admission)
        seen.append((admission.decision, admission.effective_model, admission.error_code))
        if not admission.accepted:
            break
        assert admission.max_output_tokens is not None and admission.reserve_tokens is not None
        assert admission.reserved_credits_micro is not None and admission.effective_model is not None
        assert admission.minimal_generation_floor_applied is not None
        rows = apply_reserve(rows, admission.reserve_deltas)
        usage = UsageFigures(
            step.tokens.input_tokens, min(step.tokens.output_tokens, admission.max_output_tokens)
        )
        turn = TurnCharge(
            admission.effective_model,
            admission.reserve_tokens,
            admission.max_output_tokens,
            admission.reserved_credits_micro,
            admission.minimal_generation_floor_applied,
            admission.periods,
        )
        settlement = settle(turn, usage, "completed", None, policy)
        assert not settlement.overshoot_capped
        rows = apply_deltas(rows, settlement_deltas(turn, settlement, policy))
        previous = usage.input_tokens + usage.output_tokens
    assert seen == [
        ("allow", "gpt-5.2", None),
        ("downgrade", "gpt-5-mini", None),
        ("downgrade", "gpt-5-mini", None),
        ("reject", None, "quota_exceeded"),
    ]


# --------------------------------------------------------------------------------------------
# Summary: money formatting, tables, invariants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (999_999, "0.999999"),
        (1_000_000, "1.000000"),
        (1_234_567, "1.234567"),
        (123_000_000_000_007, "123000000.000007"),
        (-1_500_000, "-1.500000"),
    ],
)
def test_format_credits_uses_integer_division(micro: int, text: str) -> None:
    assert format_credits(micro) == text


def test_format_table_aligns_columns() -> None:
    table = format_table(["state", "turns"], [["completed", 53], ["failed", 7]])
    assert table.splitlines() == [
        "state      turns",
        "---------  -----",
        "completed     53",
        "failed         7",
    ]
    assert format_table(["a", "b"], []).splitlines()[-1] == "(none)"
    assert format_table(["x"], [[None]]).splitlines()[-1] == "-"


TENANT = uuid.UUID("11111111-1111-4111-8111-111111111111")
USER = uuid.UUID("22222222-2222-4222-8222-222222222222")
DAY = date(2026, 5, 10)


def turn_row(
    charge: int,
    *,
    settled: bool = True,
    adjusted: bool = False,
    user: uuid.UUID = USER,
    model: str = "gpt-5-mini",
    method: str = "actual",
    tokens: tuple[int, int] = (1_000, 200),
) -> dict[str, Any]:
    return {
        "tenant_id": TENANT,
        "id": uuid.uuid4(),
        "request_id": uuid.uuid4(),
        "requester_user_id": user,
        "effective_model": model,
        "settlement_method": method if settled else None,
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "state": "completed",
        "billing_outcome": "completed" if settled else None,
        "committed_credits_micro": charge if settled else None,
        "settled": settled,
        "adjusted": adjusted,
        "period_daily": DAY,
        "period_monthly": DAY.replace(day=1),
    }


def billing_event(
    turn: dict[str, Any], kind: str = "usage.settled", charge: int | None = None
) -> dict[str, Any]:
    adjusted = kind == "usage.adjusted"
    return {
        "type": kind,
        "tenant_id": str(turn["tenant_id"]),
        "dedupe_key": events.dedupe_key(turn["tenant_id"], turn["id"], turn["request_id"], adjusted),
        "committed_credits_micro": turn["committed_credits_micro"] if charge is None else charge,
    }


def quota(spent: int, reserved: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "tenant_id": TENANT,
            "user_id": USER,
            "period_type": period_type,
            "period_start": start,
            "spent_credits_micro": spent,
            "reserved_credits_micro": reserved,
        }
        for period_type, start in (("daily", DAY), ("monthly", DAY.replace(day=1)))
    ]


def summary_of(turns: list[dict[str, Any]], billing: list[dict[str, Any]], **overrides: Any) -> Summary:
    accepted = len(turns)
    values: dict[str, Any] = {
        "turns": turns,
        "decisions": [
            {"command": "turn.requested", "decision": "allow", "error_code": "-", "n": accepted},
            {"command": "turn.requested", "decision": "reject", "error_code": "quota_exceeded", "n": 1},
        ],
        "quota_rows": quota(sum(t["committed_credits_micro"] or 0 for t in turns)),
        "reserved_credits_micro": 0,
        "unpublished_outbox": 0,
        "parked_events": 0,
        "billing": billing,
        "dead_letters": 0,
    }
    values.update(overrides)
    return build_summary(**values)


def test_a_consistent_deployment_passes_and_duplicates_on_the_topic_are_deduplicated() -> None:
    a, b = turn_row(1_500_000), turn_row(250_001, adjusted=True)
    billing = [
        billing_event(a),
        billing_event(a),  # the relay repeated it
        billing_event(b, charge=400_000),
        billing_event(b, "usage.adjusted"),
    ]
    s = summary_of([a, b], billing)
    assert s.failures == () and s.ok
    assert (s.settled_turns, s.settled_events, s.adjusted_events, s.billing_records) == (2, 2, 1, 4)
    assert s.decisions[("turn.requested", "reject", "quota_exceeded")] == 1
    assert s.accepted_turns == 2
    [tenant] = s.credits
    assert tenant.charged_micro == tenant.billed_micro == 1_750_001  # the adjusted amount counts
    assert s.turns_by_state == {("completed", "completed"): 2}
    text = render(s)
    assert "1.750001" in text and "OK:" in text and "FAILED" not in text


def test_each_broken_invariant_is_named() -> None:
    a, b = turn_row(1_000), turn_row(2_000)
    assert "1 settled turn(s) have no usage.settled event" in " ".join(
        summary_of([a, b], [billing_event(a)]).failures
    )
    unsettled = turn_row(0, settled=False)
    s = summary_of([a, unsettled], [billing_event(a)], quota_rows=quota(1_000))
    assert s.failures == ("1 accepted turn(s) not settled",)
    assert s.turns_by_state == {("completed", "completed"): 1, ("completed", "-"): 1}
    s = summary_of([a], [billing_event(a)], reserved_credits_micro=5, unpublished_outbox=2, parked_events=1)
    assert s.failures == (
        "reserves still held: 5 micro-credits (must be 0)",
        "2 outbox row(s) not published",
        "1 parked event(s) left",
    )
    stray = turn_row(7)
    s = summary_of([a], [billing_event(a), billing_event(stray)])
    assert any("match no settled turn" in f for f in s.failures)
    s = summary_of([a], [billing_event(a, charge=999)])
    assert any("billed credits differ" in f for f in s.failures)
    s = summary_of([a], [billing_event(a)], quota_rows=quota(1_001))
    assert any("quota spent != settled charges" in f for f in s.failures)
    adjusted = turn_row(3_000, adjusted=True)
    s = summary_of([adjusted], [billing_event(adjusted)])
    assert any("usage.adjusted" in f for f in s.failures)
    s = summary_of([a], [billing_event(a)], decisions=[])
    assert s.failures == ("accepted decisions (0) != stored turns (1)",)
    assert "FAILED: accepted decisions (0) != stored turns (1)" in render(s)
    assert "FAILED" not in render(s, verdict=False)


def test_budget_alerts_are_listed_and_matched_against_the_topic() -> None:
    a = turn_row(600_000)
    stored = {
        "tenant_id": TENANT, "user_id": USER, "bucket": "total", "period_type": "daily",
        "period_start": DAY, "threshold_percent": 50, "event_id": uuid.uuid4(),
        "limit_credits_micro": 1_000_000, "spent_credits_micro": 600_000,
    }  # fmt: skip
    event = {"type": "quota.threshold_crossed", "event_id": str(stored["event_id"])}
    s = summary_of([a], [billing_event(a)], alerts=[stored], alert_events=[event, event])
    assert s.failures == () and (len(s.alerts), s.published_alerts) == (1, 1)
    text = render(s)
    line = next(x for x in text.splitlines() if x.startswith(str(USER)[:8]) or f" {str(USER)[:8]} " in x)
    assert "total" in line and f"daily {DAY}" in line and " 50 " in line
    s = summary_of([a], [billing_event(a)], alerts=[stored], alert_events=[])
    assert s.failures == ("alerts: 1 stored, 0 distinct on quota-alerts, 1 not matching",)
    s = summary_of([a], [billing_event(a)], alerts=[], alert_events=[event])
    assert s.failures == ("alerts: 0 stored, 1 distinct on quota-alerts, 1 not matching",)


OTHER_USER = uuid.UUID("33333333-3333-4333-8333-333333333333")


def test_spend_report_is_printed_by_user_and_model_and_checked_against_the_settled_turns() -> None:
    turns = [
        turn_row(1_500_000, model="gpt-5.2", tokens=(12_000, 24_000)),
        turn_row(400_000, adjusted=True),  # re-priced: the adjusted charge counts
        turn_row(90_000, user=OTHER_USER, method="estimated", tokens=(5_000, 7_000)),  # no tokens priced
        turn_row(0, settled=False, user=OTHER_USER),  # not settled: not in the report
    ]
    settled = [t for t in turns if t["settled"]]
    billing = [billing_event(t) for t in settled] + [billing_event(turns[1], "usage.adjusted")]
    by_user = (
        SpendLine(str(USER), 2, 13_000, 24_200, 1_900_000),
        SpendLine(str(OTHER_USER), 1, 0, 0, 90_000),
    )
    by_model = (
        SpendLine("gpt-5-mini", 2, 1_000, 200, 490_000),
        SpendLine("gpt-5.2", 1, 12_000, 24_000, 1_500_000),
    )
    report = SpendReport(TENANT, DAY, DAY, by_user, by_model)

    def summary(spend: SpendReport) -> Summary:
        quota_rows = [{**r, "spent_credits_micro": 1_900_000} for r in quota(0)]  # the books' quota rows
        other = [{**r, "user_id": OTHER_USER, "spent_credits_micro": 90_000} for r in quota(0)]
        return summary_of(
            turns, billing, quota_rows=quota_rows + other, spend_reports=[spend], spend_tenant=TENANT
        )

    s = summary(report)
    assert s.failures == ("1 accepted turn(s) not settled",) and s.spend == report, s.failures
    lines = render(s).splitlines()
    start = lines.index(f"spend report (GET /v1/usage) of tenant {TENANT}, {DAY} to {DAY}, group_by=user")
    assert lines[start + 1].split() == [
        "user",
        "turns",
        "input_tokens",
        "output_tokens",
        "charged_micro",
        "credits",
    ]
    assert lines[start + 3].split() == ["22222222", "2", "13000", "24200", "1900000", "1.900000"]
    assert lines[start + 4].split() == ["33333333", "1", "0", "0", "90000", "0.090000"]
    assert lines[start + 5].split() == ["all", "3", "13000", "24200", "1990000", "1.990000"]
    assert lines[start + 6] == "group_by=model"
    assert lines[start + 9].split() == ["gpt-5-mini", "2", "1000", "200", "490000", "0.490000"]
    assert lines[start + 10].split() == ["gpt-5.2", "1", "12000", "24000", "1500000", "1.500000"]
    assert lines[start + 11].split() == ["all", "3", "13000", "24200", "1990000", "1.990000"]
    assert any(
        "spend report lines off the settled turns (1 tenant(s))" in x and x.endswith(" 0") for x in lines
    )

    # A report that differs from the books by one micro-credit, or misses a model, fails the summary.
    off = SpendReport(
        TENANT, DAY, DAY, (by_user[0], SpendLine(str(OTHER_USER), 1, 0, 0, 90_001)), by_model[:1]
    )
    s = summary(off)
    assert s.spend_mismatches == (
        f"tenant {TENANT} user {OTHER_USER}: report (1, 0, 0, 90001), books (1, 0, 0, 90000)",
        f"tenant {TENANT} model gpt-5.2: report None, books (1, 12000, 24000, 1500000)",
    )
    assert any(f.startswith("spend report (GET /v1/usage) != settled turns on 2 line(s)") for f in s.failures)
    assert "FAILED: spend report" in render(s)
    s = summary(SpendReport(TENANT, DAY, DAY, by_user[::-1], by_model))
    assert s.spend_mismatches == (f"tenant {TENANT} user: report rows out of order",)
    # Without a spend report, the summary prints none and checks none.
    plain = summary_of([turns[0]], [billing_event(turns[0])])
    assert plain.spend is None and "spend report" not in render(plain)


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_milestones_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(8, out, "simulate")
    for _ in range(8):
        bar.advance()
    bar.finish()
    assert out.getvalue().splitlines() == [
        "simulate: 2/8 (25%)",
        "simulate: 4/8 (50%)",
        "simulate: 6/8 (75%)",
        "simulate: 8/8 (100%)",
    ]


def test_progress_redraws_in_place_on_a_terminal() -> None:
    out = Tty()
    bar = Progress(4, out, "simulate", width=8)
    bar.advance(4)
    bar.finish()
    text = out.getvalue()
    assert text.startswith("\rsimulate [########] 4/4") and text.endswith("\n")
    assert text.count("\n") == 1
