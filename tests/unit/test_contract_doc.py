"""docs/contract.md names what the code has, no more and no less: topics, events and their fields,
codes, settings, policy keys, commands, tables and routes.

Each test reads one part of the document (a table under a heading, names in backticks) and
compares it with the code in both directions, so a field added to a model without the document,
or a name in the document that the code does not have, fails here.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from minichat.cli import _parser
from minichat.domain import settlement
from minichat.models.events import (
    INPUT_MODELS,
    OUTPUT_MODELS,
    DecodeError,
    Envelope,
    Usage,
    UsageAdjusted,
    UsageSettled,
    decode,
)
from minichat.models.policy import Policy
from minichat.models.topics import (
    ALL_TOPICS,
    BILLING_USAGE,
    COMPACTED,
    DEAD_LETTERS,
    INPUT_TOPICS,
    ORDER_LOG,
    POLICY_VERSIONS,
    QUOTA_ALERTS,
    TOPIC_CONFIG,
    TURN_DECISIONS,
)
from minichat.processors import read_api
from minichat.processors.topics import MIN_INSYNC, min_insync
from minichat.settings import Settings
from tests.unit.commands import command_parsers, options
from tests.unit.markdown import DOCS, ROOT, Document, Table, code_spans, names

CONTRACT = Document.read(DOCS / "contract.md")

OUTPUT_TOPICS = {
    TURN_DECISIONS: {"turn.decision"},
    BILLING_USAGE: {"usage.settled", "usage.adjusted"},
    DEAD_LETTERS: {"dead_letter"},
    POLICY_VERSIONS: {"policy.version"},
    ORDER_LOG: {"order.applied"},
    QUOTA_ALERTS: {"quota.threshold_crossed"},
}
"""Where each output event goes (the processors' producers, restated)."""

CODE_TABLES = {
    ("turn.decision", "decision"): "Decisions",
    ("turn.decision", "error_code"): "Decision error codes",
    ("turn.decision", "downgrade_reason"): "Downgrade reasons",
    ("turn.decision", "quota_scope"): "Quota scopes",
    ("dead_letter", "error_code"): "Dead-letter codes",
}
"""Enumerated fields with a table of their own; every other one is under "Vocabularies"."""


def _table(title: str) -> Table:
    return CONTRACT.section(title).table()


def _rows(table: Table) -> dict[str, list[str]]:
    listed = names(table)
    assert len(listed) == len(set(listed)), f"a name is listed twice: {listed}"
    return dict(zip(listed, table.rows, strict=True))


def _literal_values(annotation: Any) -> set[str]:
    """The values of a `Literal[...]` annotation, through `| None` and `Annotated`."""
    if get_origin(annotation) is Literal:
        return {str(v) for v in get_args(annotation)}
    if get_origin(annotation) in (Union, types.UnionType) or hasattr(annotation, "__metadata__"):
        return set().union(*(_literal_values(arg) for arg in get_args(annotation)))
    return set()


def _allows_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


def _required_cell(field: FieldInfo) -> str | None:
    """What the "required" column must say; None where a default is described in words."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if default is None or isinstance(default, bool | int | float | str):
        return f"default `{json.dumps(default)}`"
    return None


def _check_required(table: Table, fields: dict[str, FieldInfo], where: str) -> None:
    column = table.column("required")
    for name, row in _rows(table).items():
        expected = _required_cell(fields[name])
        cell = row[column]
        if expected is None:
            assert cell.startswith("default"), f"{where}: `{name}` has a default, the doc says {cell!r}"
        else:
            assert cell == expected, f"{where}: `{name}` should say {expected!r}, says {cell!r}"


# ---------------------------------------------------------------------------------------- settings


def _settings_rows() -> dict[str, str]:
    """Setting name -> its documented default, from both tables."""
    contract, tuning = _table("Settings"), _table("Tuning settings")
    rows = [
        {name: row[table.column("default")] for name, row in _rows(table).items()}
        for table in (contract, tuning)
    ]
    assert not set(rows[0]) & set(rows[1])
    return rows[0] | rows[1]


def test_every_setting_is_documented_and_every_documented_one_exists() -> None:
    expected = {f"MINICHAT_{name.upper()}" for name in Settings.model_fields}
    assert set(_settings_rows()) == expected


def test_documented_defaults_are_the_defaults() -> None:
    for env, cell in _settings_rows().items():
        field = Settings.model_fields[env.removeprefix("MINICHAT_").lower()]
        if field.default is None or isinstance(field.default, Path):
            continue  # said in words: "none: ...", "the packaged ..."
        spans = code_spans(cell)
        assert len(spans) == 1, f"{env}: the default should be one value in backticks, got {cell!r}"
        value = TypeAdapter(field.annotation).validate_python(spans[0])
        assert value == field.default, f"{env}: documented {spans[0]!r}, the code's {field.default!r}"


def test_the_setting_options_are_the_command_lines() -> None:
    documented = {env: code_spans(row[1]) for env, row in _rows(_table("Settings")).items()}
    for command, parser in command_parsers().items():
        by_dest = {action.dest: name for name, action in options(parser).items()}
        for env, option in documented.items():
            field = env.removeprefix("MINICHAT_").lower()
            # a setting documented without an option (a secret: environment only) has none
            expected = [by_dest[field]] if field in by_dest else []
            assert option == expected, f"minichat {command}: {env} is {by_dest.get(field)}"
        tuning = set(_rows(_table("Tuning settings")))
        assert not {f"MINICHAT_{dest.upper()}" for dest in by_dest} & tuning, command


# ------------------------------------------------------------------------------------------ topics


def _carried_by_input_topic(topic: str) -> set[str]:
    """The event types the decoder accepts on `topic` (any other is `unknown_type` there)."""
    carried = set()
    for event_type in INPUT_MODELS:
        try:
            decode(topic, b"", json.dumps({"type": event_type}).encode())  # type: ignore[arg-type]
        except DecodeError as exc:
            if exc.code != "unknown_type":
                carried.add(event_type)
    return carried


def test_topics_and_the_events_each_carries() -> None:
    rows = _rows(_table("Topics"))
    assert set(rows) == set(ALL_TOPICS)
    assert set().union(*OUTPUT_TOPICS.values()) == set(OUTPUT_MODELS)
    expected = {topic: _carried_by_input_topic(topic) for topic in INPUT_TOPICS} | OUTPUT_TOPICS
    carries = _table("Topics").column("carries")
    for topic, row in rows.items():
        assert set(code_spans(row[carries])) == expected[topic], topic


def test_topic_settings_are_the_ones_topics_create_sets() -> None:
    """`min.insync.replicas` depends on the factor: the table gives its value at factor 3."""
    rows = _rows(_table("Topic settings"))
    assert {name: code_spans(row[1]) for name, row in rows.items()} == {
        name: [value]
        for configs in (TOPIC_CONFIG, *COMPACTED.values(), {MIN_INSYNC: str(min_insync(3))})
        for name, value in configs.items()
    }


# ------------------------------------------------------------------------------------------ events


def test_the_envelope_is_the_envelope_model() -> None:
    table = _table("Envelope")
    assert set(_rows(table)) == set(Envelope.model_fields)
    _check_required(table, Envelope.model_fields, "envelope")


@pytest.mark.parametrize("event_type", sorted(INPUT_MODELS))
def test_each_input_event_lists_its_fields_beyond_the_envelope(event_type: str) -> None:
    model = INPUT_MODELS[event_type]
    table = _table(f"`{event_type}`")
    assert set(_rows(table)) == set(model.model_fields) - set(Envelope.model_fields)
    _check_required(table, model.model_fields, event_type)


def test_the_usage_object_is_the_usage_model() -> None:
    table = _table("Usage object")
    assert set(_rows(table)) == set(Usage.model_fields)
    _check_required(table, Usage.model_fields, "usage object")


@pytest.mark.parametrize("event_type", sorted(OUTPUT_MODELS))
def test_each_output_event_lists_every_field_and_which_may_be_null(event_type: str) -> None:
    model: type[BaseModel] = OUTPUT_MODELS[event_type]
    table = _table(f"`{event_type}`")
    fields = set(model.model_fields)
    if model is UsageAdjusted:  # "every field of usage.settled, plus:"
        fields -= set(UsageSettled.model_fields)
    rows = _rows(table)
    assert set(rows) == fields
    kind = table.column("type")
    for name, row in rows.items():
        nullable = _allows_none(model.model_fields[name].annotation)
        assert ("null" in row[kind]) == nullable, f"{event_type}.{name}: nullable is {nullable}"


# ------------------------------------------------------------------------------------------- codes


def _enumerated_fields() -> dict[tuple[str, str], set[str]]:
    """Every field of every event whose values are a fixed set (besides `type`, `schema_version`)."""
    models: dict[str, type[BaseModel]] = {**INPUT_MODELS, **OUTPUT_MODELS, "usage object": Usage}
    return {
        (event_type, name): values
        for event_type, model in models.items()
        for name, field in model.model_fields.items()
        if name not in ("type", "schema_version") and len(values := _literal_values(field.annotation)) > 1
    }


def test_every_enumerated_field_has_its_values_documented() -> None:
    enumerated = _enumerated_fields()
    assert set(CODE_TABLES) <= set(enumerated), "a code table for a field that has no fixed values"
    vocabularies = {name: set(code_spans(row[1])) for name, row in _rows(_table("Vocabularies")).items()}
    for (event_type, name), values in enumerated.items():
        title = CODE_TABLES.get((event_type, name))
        documented = set(_rows(_table(title))) if title else vocabularies.get(name)
        assert documented == values, f"{event_type}.{name} ({title or 'Vocabularies'})"
    others = {key[1] for key in enumerated if key not in CODE_TABLES}
    assert set(vocabularies) <= others, "Vocabularies names a field that has no fixed values"


def test_failure_codes_are_the_settlement_tables() -> None:
    rows = _rows(_table("Failure codes"))
    known = {settlement.ORPHAN_TIMEOUT} | settlement.RELEASED_CODES | settlement.USAGE_CODES
    assert set(rows) == known
    for code, row in rows.items():
        rule = settlement.billing_rule("failed", code)
        methods = ["actual", "estimated"] if rule.path == "usage" else [rule.path]
        assert code_spans(row[1]) == [rule.outcome, *methods], code
    assert settlement.billing_rule("failed", "anything_else").unknown_error_code


# ------------------------------------------------------------------------------------------ policy


def _policy_keys(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every key of the policy file as a dotted path (`models[].id`, `tenants.<tenant_id>.limits`)."""
    keys: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        path = prefix + name
        keys[path] = field
        annotation, args = field.annotation, get_args(field.annotation)
        if get_origin(annotation) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
            annotation = next(a for a in args if a is not type(None))  # an optional section
            args = get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _policy_keys(annotation, f"{path}.")
        elif get_origin(annotation) is tuple and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            keys |= _policy_keys(args[0], f"{path}[].")
        elif get_origin(annotation) is dict and issubclass(args[1], BaseModel):
            keys |= _policy_keys(args[1], f"{path}.<tenant_id>.")
    return keys


def test_every_policy_key_is_documented_and_every_documented_one_exists() -> None:
    table = _table("Policy file")
    keys = _policy_keys(Policy)
    assert set(_rows(table)) == set(keys)
    _check_required(table, keys, "policy file")


# ----------------------------------------------------------------- commands, storage, the read API


def test_the_commands_are_the_command_lines() -> None:
    assert set(_rows(_table("Commands"))) == {f"minichat {path}" for path in command_parsers(_parser())}


def test_the_storage_tables_are_the_migrations() -> None:
    sql = "\n".join(p.read_text() for p in (ROOT / "minichat" / "storage" / "migrations").glob("*.sql"))
    created = set(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", sql))
    assert set(_rows(_table("Storage"))) == created


def test_the_read_api_routes_are_the_workers() -> None:
    assert set(_rows(_table("Read API"))) == {path for path, _ in read_api.ROUTES} | {"/metrics"}
