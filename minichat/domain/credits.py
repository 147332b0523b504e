"""Credit arithmetic (docs/contract.md, "Credits"): integer micro-credits, one ceiling per part."""

from __future__ import annotations

from minichat.models.bounds import MAX_MULTIPLIER, MAX_TOKENS

MICRO_DIVISOR = 1_000_000
"""Multipliers are micro-credits per million tokens (docs/contract.md, "Credits")."""


class CreditError(ValueError):
    """A token count or multiplier outside its bounds. An error, never a clamp."""


def ceil_div(numerator: int, denominator: int) -> int:
    """Ceiling of `numerator / denominator` for `numerator >= 0`, `denominator > 0`."""
    return -(-numerator // denominator)


def credits_micro(input_tokens: int, output_tokens: int, in_mult: int, out_mult: int) -> int:
    """`ceil(in·in_mult / 10^6) + ceil(out·out_mult / 10^6)`, each part rounded up on its own."""
    for name, tokens in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if not 0 <= tokens <= MAX_TOKENS:
            raise CreditError(f"{name}={tokens} outside 0..={MAX_TOKENS}")
    for name, mult in (("in_mult", in_mult), ("out_mult", out_mult)):
        if not 0 <= mult <= MAX_MULTIPLIER:
            raise CreditError(f"{name}={mult} outside 0..={MAX_MULTIPLIER}")
    return ceil_div(input_tokens * in_mult, MICRO_DIVISOR) + ceil_div(output_tokens * out_mult, MICRO_DIVISOR)
