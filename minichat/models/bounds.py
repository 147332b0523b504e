"""The contract's numeric bounds (docs/contract.md, "Input events" and "Policy file"): the wire
models validate with them and the rules in `domain/` compute within them, so they belong to the
contract, not to a rule."""

from __future__ import annotations

from typing import Final

MAX_TOKENS: Final = 10_000_000
"""Upper bound of any token or call count (docs/contract.md, "Input events")."""
MAX_MULTIPLIER: Final = 10_000_000_000
"""Upper bound of a credit multiplier; with MAX_TOKENS the largest charge is 2·10^11."""
INT4_MAX: Final = 2_147_483_647
INT8_MAX: Final = 9_223_372_036_854_775_807
