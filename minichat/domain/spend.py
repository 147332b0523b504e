"""The spend report (docs/contract.md, "Read API", `GET /v1/usage`): its query's rules and the
per-model split the settlement adds to a user's daily `total` quota row."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Literal
from uuid import UUID

from minichat.domain.quota import QuotaDelta

ModelFigures = dict[str, list[int]]
"""By model charged: [turns, input_tokens, output_tokens, charged_credits_micro] (a delta may be
negative: an adjustment can lower a charge)."""


def add_model_figures(figures: ModelFigures, model: str, delta: QuotaDelta) -> None:
    """Add a settlement's (or an adjustment's) delta of a daily `total` row to the model's figures:
    a settlement counts a turn (`calls`), an adjustment only changes tokens and credits."""
    current = figures.get(model)
    if current is None:
        figures[model] = [delta.calls, delta.input_tokens, delta.output_tokens, delta.spent_credits_micro]
    else:
        current[0] += delta.calls
        current[1] += delta.input_tokens
        current[2] += delta.output_tokens
        current[3] += delta.spent_credits_micro


GroupKey = Literal["user", "day", "model"]
GROUP_KEYS: tuple[GroupKey, ...] = ("user", "day", "model")
MAX_DAYS = 366
"""Days of one report, at most (`from` and `to` both included)."""
MAX_ROWS = 10_000
"""Rows of one report, at most: a bigger one answers 400 and asks for a narrower query."""
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class SpendQuery:
    """A valid report request: UTC days `start`..`end` (both included), grouped in `group_by`'s order."""

    start: date
    end: date
    group_by: tuple[GroupKey, ...]
    user_id: UUID | None = None


def spend_query(
    start: list[str], end: list[str], group_by: list[str], user_id: list[str]
) -> SpendQuery | str:
    """The query of the parameters' values (each name's list of values), or what is wrong with them."""
    days: list[date] = []
    for name, values in (("from", start), ("to", end)):
        if len(values) != 1:
            return f"{name} is required once (a date, YYYY-MM-DD)"
        if not _DATE.fullmatch(values[0]):
            return f"{name} must be a date (YYYY-MM-DD)"
        try:
            days.append(date.fromisoformat(values[0]))
        except ValueError:
            return f"{name} must be a date (YYYY-MM-DD)"
    first, last = days
    if last < first:
        return "to must not be before from"
    if (last - first).days + 1 > MAX_DAYS:
        return f"at most {MAX_DAYS} days (from and to included)"
    if not group_by:
        return "group_by is required: user, day or model (may repeat)"
    keys: list[GroupKey] = []
    for value in group_by:
        key = next((k for k in GROUP_KEYS if k == value), None)
        if key is None:
            return "group_by must be user, day or model"
        if key in keys:
            return f"group_by {key} is given twice"
        keys.append(key)
    user: UUID | None = None
    if len(user_id) > 1:
        return "user_id may be given once"
    if user_id:
        try:
            user = UUID(user_id[0]) if len(user_id[0]) <= 64 else None
        except ValueError:
            user = None
        if user is None:
            return "user_id must be a UUID"
    return SpendQuery(first, last, tuple(keys), user)
