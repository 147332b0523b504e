"""Budget alerts (docs/contract.md, "quota.threshold_crossed"): which thresholds a bucket row's
settled spend reaches for the first time in its window.

Pure. The batch's settlements and adjustments are folded in applied order, one bucket row at a
time, from the row's spend before the batch and the thresholds the row has already crossed: the
answer does not depend on where batch boundaries fall, so a rebuild finds the crossings the live
worker found, with the same turn named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class AlertStep:
    """One settlement's or adjustment's change of one row's spend, with the terms of its turn's
    policy version and tenant (the row's limit, the thresholds)."""

    spent_delta: int
    limit: int
    thresholds: tuple[int, ...]
    request_id: UUID
    at: datetime


@dataclass(frozen=True, slots=True)
class Crossing:
    threshold_percent: int
    limit_credits_micro: int
    spent_credits_micro: int
    request_id: UUID
    occurred_at: datetime


def reached(spent: int, threshold_percent: int, limit: int) -> bool:
    """`spent × 100 ≥ pct × limit`, in integers; never where the limit is 0."""
    return limit > 0 and spent * 100 >= threshold_percent * limit


def alert_floor(limit: int, thresholds: tuple[int, ...]) -> int | None:
    """The least spend that reaches the lowest threshold (`⌈pct × limit / 100⌉`), or None when no
    spend can (limit 0, no thresholds)."""
    if limit <= 0 or not thresholds:
        return None
    return -(-thresholds[0] * limit // 100)


def crossings(spent_before: int, crossed: Iterable[int], steps: Iterable[AlertStep]) -> list[Crossing]:
    """The thresholds reached for the first time, in applied order and, within one step, in
    threshold order (40 % → 100 % gives 50, 80, 100). `crossed`: those the window already has.
    Spend that falls never re-arms a threshold."""
    fired = set(crossed)
    spent = spent_before
    found: list[Crossing] = []
    for step in steps:
        spent += step.spent_delta
        if step.spent_delta == 0 or step.limit <= 0:
            continue
        for pct in step.thresholds:
            if pct not in fired and reached(spent, pct, step.limit):
                fired.add(pct)
                found.append(Crossing(pct, step.limit, spent, step.request_id, step.at))
    return found
