"""The committed JSON Schemas in docs/schemas/ are exactly what the models export."""

from __future__ import annotations

import json
from pathlib import Path

from minichat.models.events import INPUT_MODELS, OUTPUT_MODELS
from minichat.models.schema import export_schemas, schema_files

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schemas"
FIX = "run `minichat schema export` (or `python -m minichat.models.schema`) and commit docs/schemas/"


def test_committed_schemas_match_the_models() -> None:
    expected = schema_files()
    committed = {path.name: path.read_text(encoding="utf-8") for path in sorted(SCHEMA_DIR.glob("*.json"))}
    missing = sorted(expected.keys() - committed.keys())
    stale = sorted(committed.keys() - expected.keys())
    changed = sorted(name for name in expected.keys() & committed.keys() if expected[name] != committed[name])
    assert not (missing or stale or changed), (
        f"docs/schemas/ is out of date (missing {missing}, stale {stale}, changed {changed}): {FIX}"
    )


def test_there_is_one_schema_per_event_type() -> None:
    names = set(schema_files())
    assert {f"{name}.json" for name in (*INPUT_MODELS, *OUTPUT_MODELS)} <= names
    assert names <= {f"{name}.json" for name in (*INPUT_MODELS, *OUTPUT_MODELS)} | {"policy.json"}


def test_schema_files_are_stably_formatted() -> None:
    for name, content in schema_files().items():
        schema = json.loads(content)
        assert content == json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n", name
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name


def test_every_event_schema_requires_its_type() -> None:
    files = schema_files()
    for name in (*INPUT_MODELS, *OUTPUT_MODELS):
        schema = json.loads(files[f"{name}.json"])
        assert "type" in schema["required"], name
        assert schema["properties"]["type"]["const"] == name


def test_output_schemas_list_every_field_as_required() -> None:
    # Outputs always carry every field (null when empty), and consumers may rely on that.
    files = schema_files()
    for name, model in OUTPUT_MODELS.items():
        schema = json.loads(files[f"{name}.json"])
        assert set(schema["required"]) == set(model.model_fields), name
        assert schema["additionalProperties"] is False, name


def test_input_schemas_mark_optional_fields_with_their_defaults() -> None:
    requested = json.loads(schema_files()["turn.requested.json"])
    assert "model" not in requested["required"]
    assert requested["properties"]["web_search"]["default"] is False
    assert requested["properties"]["image_count"]["default"] == 0
    assert requested["properties"]["title"]["anyOf"][0]["maxLength"] == 255
    reported = json.loads(schema_files()["usage.reported.json"])
    assert reported["properties"]["input_tokens"]["maximum"] == 10_000_000
    assert reported["properties"]["reasoning_tokens"]["minimum"] == 0


def test_export_replaces_only_the_schemas_it_writes(tmp_path: Path) -> None:
    """`minichat schema export --out .` in a project directory: its other files stay; a stale
    schema of an earlier export (a dropped event) goes."""
    others = {
        "package.json": '{"name": "gateway", "version": "1.0.0"}\n',
        "tsconfig.json": '{"$schema": "https://json.schemastore.org/tsconfig", "title": "x"}\n',
        "notes.json": "not json at all",
        "README.md": "# mine\n",
    }
    for name, content in others.items():
        (tmp_path / name).write_text(content)
    stale = tmp_path / "turn.renamed.json"
    stale.write_text(schema_files()["turn.requested.json"])
    export_schemas(tmp_path)
    for name, content in others.items():
        assert (tmp_path / name).read_text() == content, name
    assert not stale.exists()
    for name, content in schema_files().items():
        assert (tmp_path / name).read_text() == content
