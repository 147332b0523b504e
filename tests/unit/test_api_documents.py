"""docs/openapi.yaml and docs/asyncapi.yaml say what the code does: a test fails when either drifts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from minichat.domain.quota_view import Blocked, BucketView, ToolView
from minichat.models.events import (
    INPUT_MODELS,
    DeadLetter,
    OrderApplied,
    PolicyVersion,
    QuotaThresholdCrossed,
    TurnDecision,
    UsageAdjusted,
    UsageSettled,
)
from minichat.models.topics import ALL_TOPICS
from minichat.processors import read_api
from minichat.storage.read_api import SPEND_COLUMNS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = doc["components"]["schemas"][name]
    return found


def test_openapi_routes_and_fields_are_the_read_apis() -> None:
    doc = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    assert set(doc["paths"]) == {path for path, _ in read_api.ROUTES} | {"/metrics"}
    assert set(_schema(doc, "Message")["properties"]) == set(read_api.MESSAGE_FIELDS)
    assert set(_schema(doc, "MessagePage")["properties"]) == {"messages", "next"}
    assert set(_schema(doc, "Turn")["properties"]) == set(read_api.TURN_FIELDS)
    assert set(_schema(doc, "Usage")["properties"]) == set(read_api.USAGE_FIELDS)
    assert set(_schema(doc, "Quota")["properties"]) == set(read_api.QUOTA_FIELDS)
    assert set(_schema(doc, "SpendRow")["properties"]) == {*SPEND_COLUMNS.values(), *read_api.SPEND_FIGURES}
    assert set(_schema(doc, "Bucket")["properties"]) == {f.name for f in dataclasses.fields(BucketView)} | {
        "remaining"
    }
    assert set(_schema(doc, "Tool")["properties"]) == {f.name for f in dataclasses.fields(ToolView)}
    assert set(_schema(doc, "Blocked")["properties"]) == {f.name for f in dataclasses.fields(Blocked)}
    assert read_api.PAGE_MAX == 500 and read_api.PAGE_DEFAULT == 50
    limit = doc["paths"]["/v1/chats/{chat_id}/messages"]["get"]["parameters"][1]["schema"]
    assert (limit["maximum"], limit["default"]) == (read_api.PAGE_MAX, read_api.PAGE_DEFAULT)


def test_asyncapi_channels_and_messages_are_the_topics_and_events() -> None:
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    assert set(doc["channels"]) == set(ALL_TOPICS)
    messages = {m["name"] for m in doc["components"]["messages"].values()}
    outputs = (
        TurnDecision,
        UsageSettled,
        UsageAdjusted,
        DeadLetter,
        PolicyVersion,
        OrderApplied,
        QuotaThresholdCrossed,
    )
    event_types = set(INPUT_MODELS) | {model.model_fields["type"].default for model in outputs}
    assert messages == event_types
    schema_files = {p.stem for p in (DOCS / "schemas").glob("*.json")} - {"policy"}
    assert messages == schema_files
    for message in doc["components"]["messages"].values():
        ref = message["payload"]["$ref"]
        assert (DOCS / ref).exists(), ref
        assert json.loads((DOCS / ref).read_text())["title"], ref
