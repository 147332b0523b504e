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


def export_schemas(out_dir: Path) -> list[Path]:
    """Write every schema file into `out_dir` and delete stale `*.json` files there.

    `out_dir` belongs to the exporter: any other JSON file in it is removed, so a renamed or
    dropped event does not leave a schema behind.
    """
    files = schema_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out_dir.glob("*.json")):
        if stale.name not in files:
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
