"""Input estimation and reserve sizing (docs/contract.md, "Admission", rules 5 and 6)."""

from __future__ import annotations

from dataclasses import dataclass

from minichat.domain.credits import ceil_div, credits_micro
from minichat.models.policy import CatalogModel, Estimation, Policy


@dataclass(frozen=True, slots=True)
class InputEstimate:
    text_tokens: int
    """`ceil((ceil(bytes/bytes_per_token) + overhead)·(100+margin)/100)`: the `input_too_long` check."""
    input_tokens: int
    """The text estimate plus images, tool surcharges and the previous settled turn's tokens."""


@dataclass(frozen=True, slots=True)
class Reserve:
    """What one turn reserves with a given model."""

    max_output_tokens: int
    """`max_output_tokens_applied = min(model.max_output_tokens, policy.max_output_tokens_cap)`."""
    reserve_tokens: int
    credits_micro: int


def estimate_input(
    budgets: Estimation,
    *,
    content_bytes: int,
    image_count: int,
    web_search: bool,
    code_interpreter: bool,
    previous_turn_tokens: int,
) -> InputEstimate:
    """Rule 5. The margin applies to text and overhead only; surcharges are flat per turn."""
    base = ceil_div(content_bytes, budgets.bytes_per_token) + budgets.fixed_overhead_tokens
    text = ceil_div(base * (100 + budgets.safety_margin_pct), 100)
    total = (
        text
        + image_count * budgets.image_token_budget
        + (budgets.web_search_surcharge_tokens if web_search else 0)
        + (budgets.code_interpreter_surcharge_tokens if code_interpreter else 0)
        + previous_turn_tokens
    )
    return InputEstimate(text_tokens=text, input_tokens=total)


def max_output_applied(model: CatalogModel, policy: Policy) -> int:
    return min(model.max_output_tokens, policy.max_output_tokens_cap)


def reserve_for(input_tokens: int, model: CatalogModel, policy: Policy) -> Reserve:
    """`reserve_tokens = estimate + max_output_applied`, credits `credits(estimate, max_output_applied)`."""
    max_out = max_output_applied(model, policy)
    return Reserve(
        max_output_tokens=max_out,
        reserve_tokens=input_tokens + max_out,
        credits_micro=credits_micro(
            input_tokens,
            max_out,
            model.input_tokens_credit_multiplier_micro,
            model.output_tokens_credit_multiplier_micro,
        ),
    )
