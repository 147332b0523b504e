"""Credit arithmetic: behaviours b01-b06 at the contract's divisor 1,000,000 (D6; docs/behaviours.md)."""

from __future__ import annotations

import pytest

from minichat.domain.credits import CreditError, credits_micro
from minichat.models.bounds import MAX_MULTIPLIER, MAX_TOKENS


@pytest.mark.parametrize(
    ("tokens", "mults", "expected"),
    [
        pytest.param((1000, 500), (1_000_000, 3_000_000), 2500, id="b01-per-part-sum"),
        pytest.param((1, 1), (1, 1), 2, id="b02-per-part-ceiling"),
        pytest.param((0, 0), (1_750_000, 14_000_000), 0, id="b03-zero-tokens"),
        pytest.param(
            (MAX_TOKENS, MAX_TOKENS), (MAX_MULTIPLIER, MAX_MULTIPLIER), 200_000_000_000, id="b06-max"
        ),
        pytest.param((1_000_000, 0), (1_750_000, 14_000_000), 1_750_000, id="million-input-tokens"),
        pytest.param((0, 1), (1, 999_999), 1, id="output-part-rounds-up"),
    ],
)
def test_credits(tokens: tuple[int, int], mults: tuple[int, int], expected: int) -> None:
    """b01: the specification's D3 figure (2_500_000) belongs to the divisor the contract rejected."""
    assert credits_micro(*tokens, *mults) == expected


@pytest.mark.parametrize(
    ("tokens", "mults", "match"),
    [
        pytest.param((MAX_TOKENS + 1, 0), (1, 1), "input_tokens", id="b04-token-overflow"),
        pytest.param((0, MAX_TOKENS + 1), (1, 1), "output_tokens", id="b04-output-overflow"),
        pytest.param((-1, 0), (1, 1), "input_tokens", id="negative-tokens"),
        pytest.param((1, 1), (MAX_MULTIPLIER + 1, 1), "in_mult", id="b05-multiplier-overflow"),
        pytest.param((1, 1), (1, -1), "out_mult", id="negative-multiplier"),
    ],
)
def test_out_of_bounds_is_an_error_not_a_clamp(
    tokens: tuple[int, int], mults: tuple[int, int], match: str
) -> None:
    with pytest.raises(CreditError, match=match):
        credits_micro(*tokens, *mults)
