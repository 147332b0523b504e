"""The layers of docs/architecture.md, held: a package of `minichat` imports only the ones below it.

Every `import` and `from ... import` of the package counts, also inside functions (the CLI imports
lazily), so a shortcut through a function body is seen too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "minichat"

LEAVES = {"settings", "kafka_security", "tasks", "gc_tuning", "partitioning"}
"""Modules any layer above `domain/` may import."""

ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "domain": {"models"},
    "storage": {"domain", "models"} | LEAVES,
    "processors": {"storage", "domain", "models"} | LEAVES,
    "client": {"models"} | LEAVES,
    "tools": {"client", "processors", "storage", "domain", "models"} | LEAVES,
    "bench": {"tools", "client", "processors", "storage", "domain", "models"} | LEAVES,
    "cli": {"bench", "tools", "client", "processors", "storage", "domain", "models"} | LEAVES,
    "settings": {"kafka_security"},
    "kafka_security": {"settings"},  # for type annotations only
    "tasks": set(),
    "gc_tuning": set(),
    "partitioning": set(),
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "minichat" and len(parts) > 1 else None


def imports() -> dict[str, set[str]]:
    """Layer -> the other layers its modules import."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = layer_of(".".join(relative.parts))
        if source is None or source == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                target = layer_of(name)
                if target is not None and target != source:
                    found.setdefault(source, set()).add(target)
    return found


def test_every_layer_is_placed() -> None:
    found = imports()
    assert {"domain", "storage", "processors", "tools", "bench", "cli"} <= set(found)  # the scan works
    assert set(found) <= set(ALLOWED), "a new package of minichat: give it a layer here and in the doc"


def test_a_layer_imports_only_the_layers_below_it() -> None:
    wrong = {layer: sorted(targets - ALLOWED[layer]) for layer, targets in imports().items()}
    assert {layer: targets for layer, targets in wrong.items() if targets} == {}
