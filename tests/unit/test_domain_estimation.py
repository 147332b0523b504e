"""Input estimation and reserve sizing: behaviours b07-b16 and b18 (docs/behaviours.md).

Budgets are the example policy's (bytes_per_token 4, overhead 100, margin 10 %, image 1000,
web search 500, code interpreter 1000), which are also the specification's code defaults.
"""

from __future__ import annotations

import pytest

from minichat.domain.estimation import InputEstimate, estimate_input, max_output_applied, reserve_for
from minichat.models.policy import CatalogModel, load_policy
from minichat.settings import PACKAGED_POLICY

POLICY = load_policy(PACKAGED_POLICY)


def model(max_output_tokens: int, in_mult: int = 1_000_000, out_mult: int = 1_000_000) -> CatalogModel:
    return CatalogModel(
        id="m",
        tier="standard",
        input_tokens_credit_multiplier_micro=in_mult,
        output_tokens_credit_multiplier_micro=out_mult,
        max_output_tokens=max_output_tokens,
        max_input_tokens=400_000,
    )


@pytest.mark.parametrize(
    ("content_bytes", "images", "web_search", "code_interpreter", "previous", "expected"),
    [
        pytest.param(4000, 0, False, False, 0, InputEstimate(1210, 1210), id="b07-4000-bytes"),
        pytest.param(0, 0, False, False, 0, InputEstimate(110, 110), id="b08-empty"),
        pytest.param(0, 3, False, False, 0, InputEstimate(110, 3110), id="b09-images"),
        pytest.param(0, 0, True, False, 0, InputEstimate(110, 610), id="b10-web-search"),
        pytest.param(4000, 2, True, False, 0, InputEstimate(1210, 3710), id="b11-images-and-web-search"),
        pytest.param(0, 0, False, True, 0, InputEstimate(110, 1110), id="b12-code-interpreter"),
        pytest.param(400, 0, False, False, 0, InputEstimate(220, 220), id="b13-integer-ceiling"),
        pytest.param(
            0, 0, False, False, 700 + 300, InputEstimate(110, 1110), id="b14-previous-turn-after-margin"
        ),
        pytest.param(1, 0, False, False, 0, InputEstimate(112, 112), id="one-byte-rounds-up"),
    ],
)
def test_estimate_input(
    content_bytes: int,
    images: int,
    web_search: bool,
    code_interpreter: bool,
    previous: int,
    expected: InputEstimate,
) -> None:
    """b10/b11: the specification adds a 500-token file-search surcharge ("tools enabled"); the contract
    has no file search, so its surcharges are web search and code interpreter only (1110 → 610,
    4210 → 3710)."""
    got = estimate_input(
        POLICY.estimation,
        content_bytes=content_bytes,
        image_count=images,
        web_search=web_search,
        code_interpreter=code_interpreter,
        previous_turn_tokens=previous,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("model_max", "expected"),
    [
        pytest.param(4096, 4096, id="b15-model-below-cap"),
        pytest.param(65_536, 32_768, id="b16-cap-below-model"),
    ],
)
def test_max_output_applied(model_max: int, expected: int) -> None:
    assert POLICY.max_output_tokens_cap == 32_768
    assert max_output_applied(model(model_max), POLICY) == expected


def test_b18_reserve() -> None:
    """b18 at the contract's divisor: 1M/1M multipliers make one token one micro-credit."""
    reserve = reserve_for(1210, model(4096), POLICY)
    assert (reserve.max_output_tokens, reserve.reserve_tokens, reserve.credits_micro) == (4096, 5306, 5306)


def test_reserve_prices_each_part_with_its_multiplier() -> None:
    reserve = reserve_for(1000, model(500, in_mult=2_500_000_000, out_mult=2_500_000_000), POLICY)
    assert reserve.credits_micro == 2_500_000 + 1_250_000  # b22's figure, multipliers scaled ×1000


def test_policy_example_model_reserve() -> None:
    gpt = POLICY.model_by_id("gpt-5.2")
    assert gpt is not None
    reserve = reserve_for(110, gpt, POLICY)
    # ceil(110·1.75) + ceil(32768·14) micro-credits
    assert reserve.credits_micro == 193 + 458_752
