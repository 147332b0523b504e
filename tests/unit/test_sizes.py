"""The size rule of docs/architecture.md ("Sizes"): no module of `minichat/` over 500 lines and no
function over 60 (a nested function counts on its own)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "minichat"
MODULE_LINES = 500
FUNCTION_LINES = 60


def test_no_module_and_no_function_is_over_its_size() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the walk found the package
    over: list[str] = []
    for path in modules:
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MODULE_LINES:
            over.append(f"module {name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    over.append(f"function {name}:{node.lineno} {node.name}: {length} lines")
    assert over == [], "split these (docs/architecture.md, Sizes):\n" + "\n".join(over)
