"""Every SQL statement of `minichat/storage` carries the tenant (docs/contract.md, "Storage").

The statements are collected from the source, not from a hand-kept list, so a new query is checked
the day it is written:

* every module-level `str` constant of `minichat/storage/*.py` (its value after import, so
  f-strings and `.format()` results are checked as they run), and
* every string literal (or f-string) inside a function there: SQL passed inline to `fetch(...)`.

A statement is a string that contains `SELECT`, `INSERT INTO`, `UPDATE ... SET` or `DELETE FROM`
(upper case, as the code base writes SQL). Fragments and DDL are not statements.

Two checks, the second stricter than the first:

1. the statement mentions `tenant_id`;
2. it *scopes* by it: `tenant_id` in an `INSERT` column list, in a `USING (...)` join, or compared
   with `=` / `= ANY` in a condition (not merely selected, and not `... = ... AS flag`).

Statements that fail are allowed only when listed below with the reason. `SYSTEM_LEVEL` may fail
both checks (they are not about one tenant); `CROSS_TENANT_PROBES` mention the tenant but match
rows of every tenant on purpose, to detect and refuse a cross-tenant event. Both lists must stay
short; an entry that no longer fails (or no longer exists) must be removed, so they cannot rot.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STORAGE = Path(__file__).resolve().parents[2] / "minichat" / "storage"

# (module, name): name is a module-level constant, or `function()` / `Class.method()` for the SQL
# written inline in that function. `*` covers a whole module.
SYSTEM_LEVEL: dict[tuple[str, str], str] = {
    ("schema", "*"): (
        "the migrations ledger (`schema_migrations`, no tenant) and the advisory lock that serialises "
        "`db migrate`"
    ),
    ("turn_requests", "_LOCK_USERS"): (
        "advisory locks: keyed by `quota:{tenant}:{user}` text, the tenant is in the key, not a column"
    ),
    ("turns", "_LOCK_REQUESTS"): (
        "advisory locks keyed by `turn:{chat}:{request}`; chat ids are global, locks read no rows"
    ),
    ("watchdog", "_FIND_ORPHANS"): "the watchdog's scan: running turns of every tenant, by processing clock",
    ("watchdog", "_FIND_GRACE_EXPIRED"): "the watchdog's scan: turns of every tenant waiting for usage",
    ("outbox", "_FETCH_UNPUBLISHED"): "the relay's scan: every tenant's unpublished billing rows in id order",
    ("digest", "*"): "`minichat digest` hashes the state of all tenants (operator command, no content out)",
    ("metrics", "_STATE_GAUGES"): "the /metrics gauges: counts over all tenants for the operator",
    ("readers", "*"): (
        "reader roles: `minichat db grant-reader` writes login-to-tenant bindings (operator data, the "
        "tenant a value written), and `read_as_tenant` sets the tenant that row-level security scopes by"
    ),
    ("coordination", "*"): (
        "how workers share the work: `consumer_positions` (a consumer group's input offsets, scoped by "
        "the group) and the advisory locks that elect the timers' leaders (operator data, no tenant)"
    ),
}

CROSS_TENANT_PROBES: dict[tuple[str, str], str] = {
    ("turn_requests", "_LOAD_CHATS"): (
        "rule 1: a chat id taken by another tenant must be refused as chat_not_found, so the chat is "
        "found by id and `same_tenant` says whose it is; the caller keeps nothing else of a foreign row"
    ),
    ("turn_requests", "_LOAD_DECISIONS"): (
        "a command key (chat, command id) already decided for another tenant is answered as "
        "chat_not_found and stores nothing; the foreign payload is nulled in SQL, only the flag is read"
    ),
    ("turns", "_LOAD_TURNS"): (
        "a provider/usage event naming another tenant's turn is dead-lettered as tenant_mismatch "
        "instead of being parked forever; the foreign row is reduced to the `same_tenant` flag"
    ),
    ("turns", "_LOAD_DECISION_TENANTS"): "the same check for a request whose command was rejected",
    ("turn_requests", "_PARKED_REQUESTS"): "which new turns have parked events, the same key as `_UNPARK`",
    ("turns", "_UNPARK"): (
        "a decided request takes every event parked under its (chat, request), whoever sent it, so "
        "another tenant's early event is dead-lettered as tenant_mismatch rather than left parked"
    ),
}

_STATEMENT = re.compile(r"\bSELECT\b|\bINSERT\s+INTO\b|\bUPDATE\s+\w+(\s+\w+)?\s+SET\b|\bDELETE\s+FROM\b")
_DDL = re.compile(r"^\s*(CREATE|ALTER|DROP)\b")
_OPERAND = r"[\w.$:]++"  # a column, an alias.column or a $n parameter with a cast, taken whole
_INSERTS_AND_JOINS = (
    re.compile(r"INSERT\s+INTO\s+\w+\s*\([^)]*\btenant_id\b", re.S),
    re.compile(r"\bUSING\s*\([^)]*\btenant_id\b", re.S),
)
_CONDITIONS_START = re.compile(r"\b(FROM|WHERE)\b")
_COMPARISONS = (
    re.compile(rf"\btenant_id\s*=\s*(ANY\s*\()?{_OPERAND}(?!\s+AS\b)", re.S),
    re.compile(rf"{_OPERAND}\s*=\s*[\w.]*\btenant_id\b(?!\s+AS\b)", re.S),
)


@dataclass(frozen=True)
class Statement:
    module: str
    name: str
    sql: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.name)

    def __str__(self) -> str:
        return f"minichat/storage/{self.module}.py {self.name}"


def is_statement(text: str) -> bool:
    return bool(_STATEMENT.search(text)) and not _DDL.match(text)


def mentions_tenant(sql: str) -> bool:
    return re.search(r"\btenant_id\b", sql) is not None


def scopes_by_tenant(sql: str) -> bool:
    if any(pattern.search(sql) for pattern in _INSERTS_AND_JOINS):
        return True
    # comparisons count from the first FROM / WHERE on: not in a select list, not in UPDATE's SET
    start = _CONDITIONS_START.search(sql)
    return start is not None and any(p.search(sql, start.start()) for p in _COMPARISONS)


def _literal_text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with `{}` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}" for v in node.values
        )
    return None


def _inline(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(function qualname + '()', text) of each string literal inside a function, docstrings aside."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}()"
                body = child.body
                if body and isinstance(body[0], ast.Expr) and _literal_text(body[0].value) is not None:
                    body = body[1:]  # the docstring
                parts: set[int] = set()  # an f-string's pieces are Constants too: take it whole
                for statement in body:
                    for sub in ast.walk(statement):  # breadth first: an f-string before its pieces
                        if isinstance(sub, ast.JoinedStr):
                            parts.update(id(v) for v in sub.values)
                        text = _literal_text(sub)
                        if text is not None and id(sub) not in parts:
                            yield name, text
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _module_constants(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def storage_statements() -> list[Statement]:
    found: list[Statement] = []
    for path in sorted(STORAGE.glob("*.py")):
        module_name = path.stem
        if module_name.startswith("_"):
            continue  # the package's __init__
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module = importlib.import_module(f"minichat.storage.{module_name}")
        for name in sorted(_module_constants(tree)):
            value = getattr(module, name, None)
            if isinstance(value, str) and is_statement(value):
                found.append(Statement(module_name, name, value))
        for name, text in _inline(tree):
            if is_statement(text):
                found.append(Statement(module_name, name, text))
    return found


def allowed(table: dict[tuple[str, str], str], statement: Statement) -> bool:
    return statement.key in table or (statement.module, "*") in table


# ------------------------------------------------------------------------------------- the rules


def test_statements_are_found() -> None:
    statements = storage_statements()
    modules = {s.module for s in statements}
    # the agents' modules and the ones with inline SQL are all seen (the collector works)
    assert {"turn_requests", "turns", "outbox", "watchdog", "policies", "schema"} <= modules
    assert len(statements) >= 30
    # f-strings and `.format()` results are checked as they run, not as templates
    names = {s.key for s in statements}
    assert ("turn_requests", "_LOAD_LATEST_LIVE") in names
    assert ("watchdog", "_MARK_ORPHAN_SENT") in names
    [mark] = [s for s in statements if s.key == ("watchdog", "_MARK_ORPHAN_SENT")]
    assert "SET orphan_sent_at" in mark.sql


def test_every_statement_mentions_the_tenant() -> None:
    missing = [
        str(s) for s in storage_statements() if not mentions_tenant(s.sql) and not allowed(SYSTEM_LEVEL, s)
    ]
    assert missing == [], "SQL without tenant_id; scope it, or list it in SYSTEM_LEVEL with the reason"


def test_every_statement_scopes_by_the_tenant() -> None:
    unscoped = [
        str(s)
        for s in storage_statements()
        if not scopes_by_tenant(s.sql)
        and not allowed(SYSTEM_LEVEL, s)
        and not allowed(CROSS_TENANT_PROBES, s)
    ]
    assert unscoped == [], (
        "SQL that names tenant_id without filtering or writing by it; scope it, or list it in "
        "CROSS_TENANT_PROBES with the reason"
    )


@pytest.mark.parametrize("table", [SYSTEM_LEVEL, CROSS_TENANT_PROBES], ids=["system", "probes"])
def test_allow_lists_do_not_rot(table: dict[tuple[str, str], str]) -> None:
    by_key: dict[tuple[str, str], list[Statement]] = {}
    for s in storage_statements():
        by_key.setdefault(s.key, []).append(s)
    for key in table:
        if key[1] == "*":
            continue  # a module-wide entry (the digest module may not have been written yet)
        assert key in by_key, f"allow-listed {key} is gone: remove it from the list"
        assert not all(scopes_by_tenant(s.sql) for s in by_key[key]), (
            f"allow-listed {key} is scoped by the tenant now: remove it from the list"
        )
    assert all(reason.strip() for reason in table.values())
    assert len(table) <= 10, "the allow-lists must stay short: scope the statement instead"


# ------------------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM chats WHERE tenant_id = $1 AND id = $2",
        "SELECT * FROM chats c JOIN unnest($1::uuid[]) k (tenant_id) ON c.tenant_id = k.tenant_id",
        "SELECT * FROM quota_usage q JOIN unnest($1) AS k USING (tenant_id, user_id)",
        "INSERT INTO outbox (tenant_id, dedupe_key) VALUES ($1, $2)",
        "UPDATE chats c SET x = 1 FROM k WHERE c.id = k.id AND c.tenant_id = k.tenant_id",
        "DELETE FROM parked_events WHERE tenant_id = ANY($1::uuid[])",
        "SELECT 1 FROM t WHERE $1::uuid = tenant_id",
    ],
)
def test_scoped_statements_are_recognised(sql: str) -> None:
    assert is_statement(sql) and scopes_by_tenant(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, tenant_id FROM outbox WHERE published_at IS NULL",
        "SELECT c.tenant_id = k.tenant_id AS same_tenant FROM chats c JOIN k ON c.id = k.chat_id",
        "DELETE FROM parked_events p USING k WHERE p.chat_id = k.chat_id RETURNING p.tenant_id",
        "UPDATE chat_turns SET tenant_id = $1 WHERE id = $2",
        "SELECT * FROM chats WHERE id = $1",
    ],
)
def test_unscoped_statements_are_caught(sql: str) -> None:
    assert is_statement(sql) and not scopes_by_tenant(sql)


@pytest.mark.parametrize(
    "text",
    [
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY)",
        "t.chat_id, t.request_id, t.state",
        "Select the rows of one tenant.",
        "quota:{tenant}:{user}",
    ],
)
def test_fragments_and_ddl_are_not_statements(text: str) -> None:
    assert not is_statement(text)
