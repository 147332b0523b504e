"""Does a SQL statement scope by the tenant? The check 2 of `test_sql_tenant_scope.py`.

A statement scopes when it has an *anchor* that ties its rows to tenants the caller gave:

* `tenant_id` in an `INSERT INTO t (...)` column list (the row's tenant is the value written);
* a `USING (..., tenant_id, ...)` join in a statement with a *scoped source*: an
  `unnest($1::uuid[], ...) AS k (..., tenant_id, ...)` row source of parameters;
* a comparison `[a.]tenant_id = X` (or `X = [a.]tenant_id`) in a condition (`WHERE`, `ON`,
  `HAVING`; not a select list, `SET` or a flag `... AS same_tenant`), where X is a parameter
  (`$1`, `$1::uuid`), `ANY($n ...)`, a string constant, or the `tenant_id` of a scoped source.

Not anchors: a comparison with another table's `tenant_id` (a join scopes nothing by itself), a
comparison of a column with itself (`tenant_id = tenant_id`, `x.tenant_id = x.tenant_id`), and an
anchor under an `OR` (or a `UNION`) whose other branch has none: `id = $1 OR tenant_id = $2` and
`$1 IS NULL OR tenant_id = ANY($1)` match rows of every tenant.

The statement is read as tokens nested by parentheses (and `CASE ... END`, never looked into):
enough for the SQL this code base writes, not a SQL parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|--[^\n]*)
  | (?P<string>'(?:[^']|'')*')
  | (?P<open>\()
  | (?P<close>\))
  | (?P<word>[\w.$:\[\]{}]+)
  | (?P<op>[<>=!~+\-*/|%^&@#]+)
  | (?P<other>.)
    """,
    re.S | re.X,
)
_TENANT = re.compile(r"^(?:(\w+)\.)?tenant_id$")
_PARAMETER = re.compile(r"^\$\d+(?:::[\w\[\]]+)*$")
# keywords that start a clause at their level; a condition is in WHERE, ON or HAVING
_CLAUSES = frozenset(
    {
        *("SELECT", "FROM", "WHERE", "JOIN", "ON", "USING", "GROUP", "ORDER", "HAVING", "LIMIT"),
        *("OFFSET", "RETURNING", "SET", "VALUES", "INTO", "UPDATE", "DELETE", "INSERT", "WITH", "FOR"),
        "WINDOW",
    }
)
_CONDITIONS = frozenset({"WHERE", "ON", "HAVING"})
_SET_OPERATIONS = frozenset({"UNION", "INTERSECT", "EXCEPT"})
_INSERT_COLUMNS = re.compile(r"INSERT\s+INTO\s+\w+(?:\s+AS\s+\w+)?\s*\([^)]*\btenant_id\b", re.S | re.I)


@dataclass
class Group:
    """A parenthesised part (`(`), or a `CASE ... END` (`CASE`)."""

    kind: str
    items: list[str | Group] = field(default_factory=list)

    def tokens(self) -> Iterator[str]:
        for item in self.items:
            if isinstance(item, Group):
                yield from item.tokens()
            else:
                yield item


def _upper(item: str | Group) -> str:
    return item.upper() if isinstance(item, str) else ""


def parse(sql: str) -> Group:
    """The statement's tokens nested by parentheses and `CASE ... END`; unbalanced ones are kept flat."""
    root = Group("")
    stack = [root]
    for match in _TOKEN.finditer(sql):
        kind, text = match.lastgroup, match.group()
        if kind == "space":
            continue
        if kind == "open" or (kind == "word" and text.upper() == "CASE"):
            group = Group("(" if kind == "open" else "CASE")
            stack[-1].items.append(group)
            stack.append(group)
        elif len(stack) > 1 and (
            (kind == "close" and stack[-1].kind == "(")
            or (text.upper() == "END" and stack[-1].kind == "CASE")
        ):
            stack.pop()
        else:
            stack[-1].items.append(text)
    return root


def _split(items: list[str | Group], at: frozenset[str]) -> list[list[str | Group]]:
    parts: list[list[str | Group]] = [[]]
    for item in items:
        if _upper(item) in at:
            parts.append([])
        else:
            parts[-1].append(item)
    return parts


def _clauses(items: list[str | Group], inherited: bool) -> Iterator[tuple[bool, list[str | Group]]]:
    """(is a condition, items) of each clause of a level; text before the first keyword keeps the
    enclosing context (a parenthesised condition is a condition)."""
    condition, current = inherited, list[str | Group]()
    for item in items:
        word = _upper(item)
        if word in _CLAUSES:
            yield condition, current
            condition, current = word in _CONDITIONS, []
        else:
            current.append(item)
    yield condition, current


def scoped_sources(root: Group) -> set[str]:
    """Aliases of `unnest(<parameters>) [WITH ORDINALITY] [AS] k (..., tenant_id, ...)` row sources."""
    found: set[str] = set()

    def walk(group: Group) -> None:
        items = group.items
        for i, item in enumerate(items):
            if isinstance(item, Group):
                walk(item)
                continue
            if item.lower() != "unnest" or i + 1 >= len(items) or not isinstance(items[i + 1], Group):
                continue
            arguments = items[i + 1]
            assert isinstance(arguments, Group)
            if not any(_PARAMETER.match(t) for t in arguments.tokens()):
                continue
            rest = [x for x in items[i + 2 : i + 7] if _upper(x) not in {"WITH", "ORDINALITY", "AS"}]
            if len(rest) < 2:
                continue
            alias, columns = rest[0], rest[1]
            if isinstance(alias, str) and isinstance(columns, Group) and "tenant_id" in columns.items:
                found.add(alias)

    walk(root)
    return found


def _tenant_side(item: str | Group) -> re.Match[str] | None:
    return _TENANT.match(item) if isinstance(item, str) else None


def _scopes_as_operand(items: list[str | Group], i: int, sources: set[str], column: str) -> bool:
    """Whether items[i] (the other side of `column = ...`) ties `column` to given tenants."""
    operand = items[i]
    if isinstance(operand, Group):
        return False
    if _PARAMETER.match(operand) or operand.startswith("'"):
        return True
    if operand.upper() == "ANY" and i + 1 < len(items) and isinstance(items[i + 1], Group):
        argument = items[i + 1]
        assert isinstance(argument, Group)
        return any(_PARAMETER.match(t) for t in argument.tokens())
    other = _TENANT.match(operand)
    if other is None or operand == column:
        return False  # another column, or the column compared with itself
    return other.group(1) in sources


def _anchored(items: list[str | Group], sources: set[str]) -> bool:
    """A comparison at this level ties `tenant_id` to given tenants."""
    for i, item in enumerate(items):
        if item != "=" or i == 0 or i + 1 >= len(items):
            continue
        before = items[i - 1]
        if (left := _tenant_side(before)) is not None and _scopes_as_operand(
            items, i + 1, sources, left.group()
        ):
            return True
        right = _tenant_side(items[i + 1])
        if (
            right is not None
            and isinstance(before, str)
            and _scopes_as_operand(items, i - 1, sources, right.group())
        ):
            return True
    return False


def _branch_scoped(items: list[str | Group], condition: bool, sources: set[str]) -> bool:
    if condition and _anchored(items, sources):
        return True
    return any(
        _level_scoped(item.items, condition, sources)
        for item in items
        if isinstance(item, Group) and item.kind == "("
    )


def _level_scoped(items: list[str | Group], condition: bool, sources: set[str]) -> bool:
    parts = _split(items, _SET_OPERATIONS)
    if len(parts) > 1:
        return all(_level_scoped(part, condition, sources) for part in parts)
    for is_condition, clause in _clauses(items, condition):
        branches = _split(clause, frozenset({"OR"}))
        if all(_branch_scoped(branch, is_condition, sources) for branch in branches):
            return True
    return False


def _using_join(root: Group) -> bool:
    """A `USING (a, tenant_id, ...)` join somewhere in the statement."""

    def walk(group: Group) -> Iterator[bool]:
        for i, item in enumerate(group.items):
            if isinstance(item, Group):
                yield from walk(item)
            elif item.upper() == "USING" and i + 1 < len(group.items):
                columns = group.items[i + 1]
                yield (
                    isinstance(columns, Group)
                    and all(isinstance(c, str) and (c == "," or c.isidentifier()) for c in columns.items)
                    and "tenant_id" in columns.items
                )

    return any(walk(root))


def scopes_by_tenant(sql: str) -> bool:
    if _INSERT_COLUMNS.search(sql):
        return True
    root = parse(sql)
    sources = scoped_sources(root)
    if sources and _using_join(root):
        return True
    return _level_scoped(root.items, False, sources)
