"""Every SQL statement of `minichat` lives in `minichat/storage/` and carries the tenant (docs/contract.md,
"Storage").

Where SQL may be: the whole package is scanned. Outside `minichat/storage/`, a string that reads
as SQL (it starts with a statement keyword: `SELECT`, `INSERT INTO`, `CREATE`, `SHOW`, `SET` ...;
docstrings aside) or a call of a query method of asyncpg (`execute`, `fetch`, `fetchrow`,
`fetchval`, `cursor`, `copy_*` ...) fails the test, and so does a `.sql` file: a tool, a
processor or the bench runs SQL only through a storage function.

Which statements are checked, collected from the source, not from a hand-kept list, so a new query
is checked the day it is written:

* every module-level `str` constant of `minichat/storage/*.py` (its value after import, so
  f-strings and `.format()` results are checked as they run), and
* every string literal (or f-string) inside a function there: SQL passed inline to `fetch(...)`.

A statement is a string that contains `SELECT`, `INSERT INTO`, `UPDATE ... SET` or `DELETE FROM`
(upper case, as the code base writes SQL). Fragments and DDL are not statements.

Two checks, the second stricter than the first:

1. the statement mentions `tenant_id`;
2. it *scopes* by it (tests/unit/sql_scope.py): `tenant_id` in an `INSERT` column list, in a
   `USING (...)` join to an `unnest($n ...) AS k (tenant_id, ...)` of parameters, or compared in
   a condition (`WHERE`, `ON`, `HAVING`; not merely selected, not a flag `... = ... AS same`) with
   a parameter, `ANY($n)`, a constant or such an unnest's `tenant_id`. A join to another table's
   `tenant_id` (`c.tenant_id = t.tenant_id`) alone, a self-comparison (`tenant_id = tenant_id`)
   and a condition under an `OR` (or `UNION`) whose other branch does not scope
   (`id = $1 OR tenant_id = $2`, `$1 IS NULL OR tenant_id = ANY($1)`) scope nothing.

Exceptions are declared where a reader finds them, and each says why:

* A storage module that is system-level as a whole (the migrations ledger, the digest, the
  workers' coordination, reader logins, the /metrics gauges, connection-level statements, the
  bench's scratch databases) declares a module constant `SYSTEM_LEVEL = "why"`. Its statements
  may skip check 1; one that does name `tenant_id` is about tenants after all and must pass check
  2 like any other (or be listed below). A declaration must still be needed (one statement of the
  module at least does not name the tenant), and `docs/security.md` §2 must name the module.
* A single statement of a tenant module: `SYSTEM_STATEMENTS` may fail both checks (not about one
  tenant), `CROSS_TENANT_PROBES` mention the tenant but match rows of every tenant on purpose, to
  detect and refuse a cross-tenant event. Both lists stay short (at most 10 entries each); an
  entry that no longer fails (or no longer exists) must be removed, so they cannot rot.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.sql_scope import scopes_by_tenant

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "minichat"
STORAGE = PACKAGE / "storage"
SECURITY_DOC = ROOT / "docs" / "security.md"

# (module, name): name is a module-level constant, or `function()` / `Class.method()` for the SQL
# written inline in that function.
SYSTEM_STATEMENTS: dict[tuple[str, str], str] = {
    ("watchdog", "_FIND_ORPHANS"): "the watchdog's scan: running turns of every tenant, by processing clock",
    ("watchdog", "_FIND_GRACE_EXPIRED"): "the watchdog's scan: turns of every tenant waiting for usage",
    ("outbox", "_FETCH_UNPUBLISHED"): "the relay's scan: every tenant's unpublished billing rows in id order",
    ("readers", "_UNBIND"): "a login's binding is found by the login (`role_name`); the tenant is returned",
    ("readers", "read_as_tenant()"): "sets the tenant that row-level security scopes the session's reads by",
    **{
        ("summary", name): (
            "`simulate`'s summary and quiescence checks: the given tenants, or every tenant when `$1` is "
            "NULL (`$1 IS NULL OR tenant_id = ANY($1)`); counts and figures for the operator"
        )
        for name in ("_BACKLOG", "_TURNS", "_DECISIONS", "_QUOTA", "_ALERTS")
    },
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
    return statement.key in table


def system_modules() -> dict[str, str]:
    """Storage module -> the reason it gives in its `SYSTEM_LEVEL` declaration."""
    found = {}
    for path in sorted(STORAGE.glob("*.py")):
        module = importlib.import_module(f"minichat.storage.{path.stem}")
        reason = getattr(module, "SYSTEM_LEVEL", None)
        if reason is not None:
            found[path.stem] = reason
    return found


def exempt_from_mention(statement: Statement) -> bool:
    return statement.module in system_modules() or allowed(SYSTEM_STATEMENTS, statement)


def exempt_from_scope(statement: Statement) -> bool:
    in_system_module = statement.module in system_modules() and not mentions_tenant(statement.sql)
    return (
        in_system_module or allowed(SYSTEM_STATEMENTS, statement) or allowed(CROSS_TENANT_PROBES, statement)
    )


# ------------------------------------------------------------------------------------- the rules


def test_statements_are_found() -> None:
    statements = storage_statements()
    modules = {s.module for s in statements}
    # the agents' modules and the ones with inline SQL are all seen (the collector works)
    assert {"turn_requests", "turns", "outbox", "watchdog", "policies", "schema"} <= modules
    assert len(statements) >= 30
    # f-strings and `.format()` results are checked as they run, not as templates
    names = {s.key for s in statements}
    assert ("turn_requests", "_LOAD_LATEST") in names
    assert ("watchdog", "_MARK_ORPHAN_SENT") in names
    [mark] = [s for s in statements if s.key == ("watchdog", "_MARK_ORPHAN_SENT")]
    assert "SET orphan_sent_at" in mark.sql


def test_every_statement_mentions_the_tenant() -> None:
    missing = [
        str(s) for s in storage_statements() if not mentions_tenant(s.sql) and not exempt_from_mention(s)
    ]
    assert missing == [], (
        "SQL without tenant_id; scope it, or list it in SYSTEM_STATEMENTS with the reason (a module that "
        "is system-level as a whole declares SYSTEM_LEVEL)"
    )


def test_every_statement_scopes_by_the_tenant() -> None:
    unscoped = [
        str(s) for s in storage_statements() if not scopes_by_tenant(s.sql) and not exempt_from_scope(s)
    ]
    assert unscoped == [], (
        "SQL that names tenant_id without filtering or writing by it; scope it, or list it in "
        "CROSS_TENANT_PROBES or SYSTEM_STATEMENTS with the reason"
    )


@pytest.mark.parametrize("table", [SYSTEM_STATEMENTS, CROSS_TENANT_PROBES], ids=["system", "probes"])
def test_allow_lists_do_not_rot(table: dict[tuple[str, str], str]) -> None:
    by_key: dict[tuple[str, str], list[Statement]] = {}
    for s in storage_statements():
        by_key.setdefault(s.key, []).append(s)
    for key in table:
        assert key in by_key, f"allow-listed {key} is gone: remove it from the list"
        assert not all(scopes_by_tenant(s.sql) for s in by_key[key]), (
            f"allow-listed {key} is scoped by the tenant now: remove it from the list"
        )
    assert all(reason.strip() for reason in table.values())
    assert len(table) <= 10, "the allow-lists must stay short: scope the statement instead"


def test_system_level_modules_are_needed_and_documented() -> None:
    declared = system_modules()
    assert {"schema", "digest", "coordination", "bench"} <= declared.keys()  # the declarations are read
    statements = storage_statements()
    security = SECURITY_DOC.read_text(encoding="utf-8")
    for module, reason in declared.items():
        assert isinstance(reason, str) and reason.strip(), f"storage/{module}.py: SYSTEM_LEVEL must say why"
        own = [s for s in statements if s.module == module]
        assert any(not mentions_tenant(s.sql) for s in own), (
            f"storage/{module}.py declares SYSTEM_LEVEL but every statement of it names the tenant: "
            "drop the declaration"
        )
        assert f"storage/{module}.py" in security, f"docs/security.md §2 must name storage/{module}.py"


# ------------------------------------------------------------------------------ no SQL elsewhere

_READS_AS_SQL = re.compile(
    r"^\s*(WITH\s+\w+\s+AS\b|SELECT\b|INSERT\s+INTO\b|UPDATE\s+\w+\b|DELETE\s+FROM\b|CREATE\b|ALTER\b"
    r"|DROP\b|TRUNCATE\b|SHOW\b|SET\s+\w+|GRANT\b|REVOKE\b|COPY\b|LOCK\s+TABLE\b|VACUUM\b|ANALYZE\b)"
)
_QUERY_METHODS = frozenset(
    {
        "execute",
        "executemany",
        "fetch",
        "fetchrow",
        "fetchval",
        "fetchmany",
        "cursor",
        "prepare",
        "copy_records_to_table",
        "copy_to_table",
        "copy_from_table",
        "copy_from_query",
    }
)


_NOT_QUERIES = frozenset({"response.prepare"})
"""Calls that share a query method's name: aiohttp's `StreamResponse.prepare` sends headers."""


def _query_method(func: ast.expr) -> bool:
    named = isinstance(func, ast.Attribute) and func.attr in _QUERY_METHODS
    return named and ast.unparse(func) not in _NOT_QUERIES


def sql_outside_storage(source: str) -> list[str]:
    """Where `source` (a module outside storage/) holds SQL or runs a query: line and what."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant | ast.JoinedStr) and id(node) not in docstrings:
            text = _literal_text(node)
            if text is not None and _READS_AS_SQL.match(text):
                found.append(f"line {node.lineno}: SQL {text.strip()[:40]!r}")
        elif isinstance(node, ast.Call) and _query_method(node.func):
            found.append(f"line {node.lineno}: .{ast.unparse(node.func)}(...)")
    return found


def test_no_sql_outside_storage() -> None:
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if STORAGE not in p.parents]
    assert len(modules) > 50 and PACKAGE / "cli" / "__init__.py" in modules  # the whole package is scanned
    found = {
        str(path.relative_to(ROOT)): hits
        for path in modules
        if (hits := sql_outside_storage(path.read_text(encoding="utf-8")))
    }
    assert found == {}, "SQL outside minichat/storage/: move it next to a storage function that runs it"
    sql_files = [p for p in PACKAGE.rglob("*.sql") if STORAGE not in p.parents]
    assert sql_files == []


@pytest.mark.parametrize(
    "source",
    [
        'X = "SELECT 1"',
        "async def f(con):\n    await con.fetchval(Q)",
        "async def f(con, name):\n    await admin.execute(f'DROP DATABASE \"{name}\"')",
        'Q = """\nINSERT INTO chats (tenant_id) VALUES ($1)\n"""',
        'def f(name):\n    return f"SHOW {name}"',
    ],
)
def test_sql_outside_storage_is_caught(source: str) -> None:
    assert sql_outside_storage(source)


@pytest.mark.parametrize(
    "source",
    [
        'def f():\n    """Median of `SELECT 1` round trips."""',
        'X = f"PostgreSQL SELECT 1 {value} us"',
        "worker.execute_from_commandline()",
        'Y = "Select the rows of one tenant."',
    ],
)
def test_prose_about_sql_is_not_sql(source: str) -> None:
    assert sql_outside_storage(source) == []


# ------------------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM chats WHERE tenant_id = $1 AND id = $2",
        "SELECT * FROM chats c JOIN unnest($1::uuid[]) k (tenant_id) ON c.tenant_id = k.tenant_id",
        "SELECT * FROM quota_usage q JOIN unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, user_id)"
        " USING (tenant_id, user_id)",
        "SELECT * FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS k (tenant_id, id, n)"
        " JOIN outbox o ON o.id = k.id AND o.tenant_id = k.tenant_id",
        "INSERT INTO outbox (tenant_id, dedupe_key) VALUES ($1, $2)",
        "INSERT INTO consumer_positions AS p (tenant_id, topic) VALUES ($1, $2)",
        "UPDATE chats c SET x = 1 FROM unnest($1::uuid[], $2::uuid[]) AS k (id, tenant_id)"
        " WHERE c.id = k.id AND c.tenant_id = k.tenant_id",
        "DELETE FROM parked_events WHERE tenant_id = ANY($1::uuid[])",
        "SELECT 1 FROM t WHERE $1::uuid = tenant_id",
        "SELECT 1 FROM policy_versions WHERE tenant_id = '00000000-0000-0000-0000-000000000000'::uuid",
        # a join to another table scopes when the statement also filters by a parameter
        "SELECT * FROM chat_turns t JOIN chats c ON c.tenant_id = t.tenant_id AND c.id = t.chat_id"
        " WHERE t.tenant_id = $1 AND t.chat_id = $2",
        # an OR whose every branch scopes, and an OR beside the tenant filter, not above it
        "SELECT 1 FROM chats WHERE tenant_id = $1 OR tenant_id = $2",
        "SELECT EXISTS (SELECT FROM chats WHERE tenant_id = $1) OR EXISTS (SELECT FROM quota_usage"
        " WHERE tenant_id = $1)",
        "SELECT 1 FROM messages WHERE tenant_id = $1 AND ($2::uuid IS NULL OR chat_id = $2)",
        "SELECT 1 FROM messages WHERE (tenant_id = $1) AND (id = $2 OR chat_id = $3)",
        # a UNION of scoped parts, under a lateral join to an unnest of parameters
        "SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, chat_id) CROSS JOIN LATERAL ("
        " (SELECT * FROM chat_turns c WHERE c.chat_id = k.chat_id AND c.tenant_id = k.tenant_id)"
        " UNION ALL (SELECT * FROM chat_turns c WHERE c.tenant_id = k.tenant_id)) t",
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
        "SELECT CASE WHEN tenant_id = $1 THEN id END FROM chats",
    ],
)
def test_unscoped_statements_are_caught(sql: str) -> None:
    assert is_statement(sql) and not scopes_by_tenant(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM messages m JOIN chats c ON c.tenant_id = m.tenant_id AND c.id = m.chat_id",
        "SELECT * FROM chat_turns t JOIN chats c ON c.id = t.chat_id WHERE c.tenant_id = t.tenant_id",
        "UPDATE chats c SET x = 1 FROM k WHERE c.id = k.id AND c.tenant_id = k.tenant_id",
        "DELETE FROM messages m USING chats c WHERE m.chat_id = c.id AND m.tenant_id = c.tenant_id",
        # USING joins two tables, not a table to the caller's tenants
        "SELECT * FROM messages JOIN chats USING (tenant_id, chat_id)",
        # an unnest of something else than parameters is no scoped source
        "SELECT * FROM chats c JOIN unnest(ARRAY(SELECT tenant_id FROM t)) AS k (tenant_id)"
        " ON c.tenant_id = k.tenant_id",
    ],
)
def test_a_join_alone_scopes_nothing(sql: str) -> None:
    assert is_statement(sql) and not scopes_by_tenant(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM chats WHERE tenant_id = tenant_id AND id = $1",
        "SELECT * FROM chats c WHERE c.tenant_id = c.tenant_id",
        "UPDATE chat_turns t SET x = 1 WHERE t.id = $1 AND t.tenant_id = t.tenant_id",
        "SELECT * FROM unnest($1::uuid[]) AS k (tenant_id) JOIN chats c ON k.tenant_id = k.tenant_id",
    ],
)
def test_a_self_comparison_scopes_nothing(sql: str) -> None:
    assert is_statement(sql) and not scopes_by_tenant(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM messages WHERE id = $1 OR tenant_id = $2",
        "SELECT * FROM messages WHERE tenant_id = $2 OR id = $1",
        "SELECT * FROM messages WHERE tenant_id = $1 AND chat_id = $2 OR id = $3",
        "SELECT * FROM messages WHERE chat_id = $2 AND (id = $1 OR tenant_id = $3)",
        "SELECT * FROM messages WHERE id = $1 or tenant_id = $2",
        "SELECT * FROM chat_turns WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1::uuid[]))",
        "SELECT * FROM chats c JOIN unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, id)"
        " ON c.tenant_id = k.tenant_id OR c.id = k.id",
        "SELECT * FROM chats WHERE (tenant_id = $1 OR (id = $2 OR tenant_id = $3))",
        "SELECT id FROM chats WHERE tenant_id = $1 UNION SELECT id FROM messages",
    ],
)
def test_a_bypassable_disjunction_scopes_nothing(sql: str) -> None:
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
