"""JSON Schema files of the wire contract, exported to `docs/schemas/` and checked for drift by a test."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from minichat.models.events import INPUT_MODELS, OUTPUT_MODELS

DEFAULT_OUT_DIR = Path("docs/schemas")
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _render(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> str:
    schema: dict[str, Any] = {"$schema": _DIALECT, **model.model_json_schema(mode=mode)}
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _policy_model() -> type[BaseModel] | None:
    # The policy model is owned elsewhere and may not exist yet; only its absence is tolerated,
    # a policy module that fails to import for another reason is a bug and must surface.
    try:
        module = importlib.import_module("minichat.models.policy")
    except ModuleNotFoundError as exc:
        if exc.name == "minichat.models.policy":
            return None
        raise
    policy = getattr(module, "Policy", None)
    if isinstance(policy, type) and issubclass(policy, BaseModel):
        return policy
    return None


def schema_files() -> dict[str, str]:
    """File name -> content of every schema file, in name order.

    Inputs are described as the decoder accepts them (validation mode), outputs as the processor
    writes them (serialization mode: every field is always present).
    """
    files = {f"{name}.json": _render(model, "validation") for name, model in INPUT_MODELS.items()}
    files |= {f"{name}.json": _render(model, "serialization") for name, model in OUTPUT_MODELS.items()}
    policy = _policy_model()
    if policy is not None:
        files["policy.json"] = _render(policy, "validation")
    return dict(sorted(files.items()))


def _exported_before(path: Path) -> bool:
    """A schema this exporter wrote (a JSON object in its dialect with a title): the only kind of
    file an export may delete. A directory's other files (`package.json`, `tsconfig.json`, a
    JSON Schema of another dialect) are never touched."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(loaded, dict) and loaded.get("$schema") == _DIALECT and "title" in loaded


def export_schemas(out_dir: Path) -> list[Path]:
    """Write every schema file into `out_dir` and delete the stale schemas an export wrote there
    (a renamed or dropped event leaves none behind); any other file stays as it was."""
    files = schema_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out_dir.glob("*.json")):
        if stale.name not in files and _exported_before(stale):
            stale.unlink()
    written: list[Path] = []
    for name, content in files.items():
        path = out_dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m minichat.models.schema [--out DIR]`; the `minichat schema export` command calls this."""
    parser = argparse.ArgumentParser(description="Export the event JSON Schemas.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="target directory")
    args = parser.parse_args(argv)
    for path in export_schemas(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
