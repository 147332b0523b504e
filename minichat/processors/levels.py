"""A merged batch cut into homogeneous steps without changing its outcome (pure).

The worker applies a batch as a few set-based steps — all commands of a step through the admission
handler, all facts of a step through the turn-events handler — instead of one step per record. A
record may move ahead of earlier records of the other kind only when it cannot interact with any of
them: it shares no *conflict key* with them (the chat; and the owner's quota rows, for commands that
reserve and facts that can settle). Records that share a key keep their merged order across steps,
and each handler folds its step in order, so the batch ends exactly as if applied one by one.

A big batch is also split into groups that share no key at all (`split_disjoint`), which the
engine applies in concurrent transactions: one group's Python runs while the other's statements
wait for PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class Step(Generic[T]):
    kind: str
    items: list[T] = field(default_factory=list)


def plan_steps(
    items: Sequence[T], kind: Callable[[T], str], keys: Callable[[T], Iterable[Hashable]]
) -> list[Step[T]]:
    """Each item goes to the first step of its kind at or after the last step that holds an earlier
    item sharing one of its keys; a new step is appended when there is none."""
    steps: list[Step[T]] = []
    last: dict[Hashable, int] = {}
    for item in items:
        item_kind = kind(item)
        item_keys = list(keys(item))
        floor = max((last[k] for k in item_keys if k in last), default=0)
        index = next((i for i in range(floor, len(steps)) if steps[i].kind == item_kind), None)
        if index is None:
            steps.append(Step(item_kind))
            index = len(steps) - 1
        steps[index].items.append(item)
        for k in item_keys:
            last[k] = max(last.get(k, 0), index)
    return steps


def split_disjoint(items: Sequence[T], keys: Callable[[T], Iterable[Hashable]], parts: int) -> list[list[T]]:
    """At most `parts` groups that share no key, each in the items' order: items connected by a
    key, directly or through other items, stay in one group (a connected component). Components
    go largest first to the smallest group. Applied separately, in any interleaving, the groups end
    as the items applied one by one: nothing of one group reads or writes what the other's do."""
    parent: dict[Hashable, Hashable] = {}

    def root(key: Hashable) -> Hashable:
        top = parent.setdefault(key, key)
        while top != parent[top]:
            top = parent[top]
        while key != top:  # path compression
            parent[key], key = top, parent[key]
        return top

    firsts: list[Hashable] = []
    for item in items:
        item_keys = iter(keys(item))
        first = root(next(item_keys))
        for key in item_keys:
            other = root(key)
            if other != first:
                parent[other] = first
        firsts.append(first)
    components: dict[Hashable, int] = {}
    for first in firsts:
        top = root(first)
        components[top] = components.get(top, 0) + 1
    sizes = [0] * max(1, min(parts, len(components)))
    group_of: dict[Hashable, int] = {}
    for top, size in sorted(components.items(), key=lambda c: -c[1]):
        smallest = sizes.index(min(sizes))
        group_of[top] = smallest
        sizes[smallest] += size
    groups: list[list[T]] = [[] for _ in sizes]
    for item, first in zip(items, firsts, strict=True):
        groups[group_of[root(first)]].append(item)
    return [g for g in groups if g]
