"""docs/asyncapi.yaml is a valid AsyncAPI 3 document (parsed by pydantic-asyncapi) that says how to
reach the topics: a server, Kafka bindings per channel (topic, partitions, configuration), the
record key of every message as a schema, turn-requests answered on turn-decisions (request/reply),
and message payloads that are the exported JSON Schemas of docs/schemas/."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic_asyncapi
import yaml

from minichat.models.schema import schema_files
from minichat.models.topics import ALL_TOPICS, topic_config
from minichat.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHAT_KEYED = ("turn-requests", "provider-responses", "usage", "turn-decisions")


def _doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    return loaded


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_document_parses() -> None:
    doc = copy.deepcopy(_doc())
    # pydantic-asyncapi 0.3 models no Kafka *message* binding (its field only admits null): those
    # are checked below, the rest of the document by the parser.
    for message in doc["components"]["messages"].values():
        message.get("bindings", {}).pop("kafka", None)
    parsed = pydantic_asyncapi.AsyncAPIV3.model_validate(doc)
    assert parsed.asyncapi == "3.0.0" and parsed.servers


def test_every_internal_reference_resolves() -> None:
    doc = _doc()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                _resolve(doc, ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)


def test_a_kafka_server_and_bindings_of_every_channel() -> None:
    doc = _doc()
    [server] = doc["servers"].values()
    assert server["protocol"] == "kafka" and "bootstrap" in server["variables"]
    partitions = Settings.model_fields["partitions"].default
    for name in ALL_TOPICS:
        binding = doc["channels"][name]["bindings"]["kafka"]
        assert binding["topic"] == f"minichat.{name}" and binding["partitions"] == partitions
        config = binding["topicConfiguration"]
        expected = topic_config(name)
        assert config["cleanup.policy"] == [expected.get("cleanup.policy", "delete")]
        assert str(config["retention.ms"]) == expected["retention.ms"]
        assert str(config["max.message.bytes"]) == expected["max.message.bytes"]


def test_every_message_declares_its_key() -> None:
    doc = _doc()
    for name, channel in doc["channels"].items():
        for ref in channel["messages"].values():
            message = _resolve(doc, ref["$ref"])
            key = _resolve(doc, message["bindings"]["kafka"]["key"]["$ref"])
            if name in CHAT_KEYED:
                assert key == doc["components"]["schemas"]["chat_id"], message["name"]
                assert key["format"] == "uuid"
            assert key["description"].startswith("The record key")


def test_turn_requests_are_answered_on_turn_decisions() -> None:
    doc = _doc()
    reply = doc["operations"]["send_turn_requests"]["reply"]
    assert reply["channel"] == {"$ref": "#/channels/turn-decisions"}
    [answer] = reply["messages"]
    assert _resolve(doc, answer["$ref"]) == doc["channels"]["turn-decisions"]["messages"]["turn_decision"]
    decision = doc["components"]["messages"]["turn_decision"]
    assert decision["correlationId"]["location"] == "$message.payload#/command_event_id"


def test_payloads_are_the_exported_schemas() -> None:
    exported = schema_files()
    for message in _doc()["components"]["messages"].values():
        ref = message["payload"]["$ref"]
        assert ref == f"schemas/{message['name']}.json", ref
        text = (DOCS / ref).read_text()
        assert text == exported[f"{message['name']}.json"], ref
        assert json.loads(text)["properties"]["type"]
