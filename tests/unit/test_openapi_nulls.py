"""docs/openapi.yaml accepts the read API's normal answers with null fields (a quota with
`blocked: null`, a refused request's turn with `state: null` and `usage: null`), checked with
openapi-core as the integration tests check every response; the OAS 3.0 form it had (`nullable`
beside a `$ref`, ignored there; an enum without null) refuses them."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from openapi_core.validation.response.exceptions import InvalidData

from tests.openapi_check import _document, check_response, openapi_of

QUOTA = {
    "user_id": str(uuid.uuid4()),
    "policy_version": 3,
    "buckets": [
        {
            "bucket": "total",
            "period_type": "daily",
            "period_start": "2026-12-07",
            "limit": 1000,
            "spent": 10,
            "reserved": 0,
            "remaining": 990,
            "thresholds_crossed": [],
        }
    ],
    "tools": [{"tool": "web_search", "calls_today": 0, "daily_quota": 5}],
    "blocked": None,
}
REFUSED_TURN = {
    "chat_id": str(uuid.uuid4()),
    "request_id": str(uuid.uuid4()),
    "state": None,
    "decision": {"decision": "reject", "error_code": "generation_in_progress", "replay": False},
    "billing_outcome": None,
    "settlement_method": None,
    "committed_credits_micro": None,
    "usage": None,
    "settled_at": None,
}
ANSWERS = [
    (f"/v1/users/{uuid.uuid4()}/quota", QUOTA),
    (f"/v1/chats/{uuid.uuid4()}/turns/{uuid.uuid4()}", REFUSED_TURN),
]


def _as_before() -> dict[str, Any]:
    """The document as it was: OAS 3.0, `nullable` beside `$ref`, no null in an enum."""

    def back(node: Any) -> Any:
        if isinstance(node, list):
            return [back(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: back(v) for k, v in node.items()}
        if isinstance(node.get("type"), list):
            node = {**node, "type": node["type"][0], "nullable": True}
        if "enum" in node:
            node["enum"] = [x for x in node["enum"] if x is not None]
        one_of = node.get("oneOf")
        if one_of and one_of[-1] == {"type": "null"}:
            node = {"$ref": one_of[0]["$ref"], "nullable": True}
        return node

    doc: dict[str, Any] = back(copy.deepcopy(_document()))
    doc["openapi"] = "3.0.3"
    return doc


@pytest.mark.parametrize(("path", "body"), ANSWERS)
def test_the_document_accepts_null_fields(path: str, body: dict[str, Any]) -> None:
    check_response(path, 200, body)


@pytest.mark.parametrize(("path", "body"), ANSWERS)
def test_the_oas30_form_refused_them(path: str, body: dict[str, Any]) -> None:
    with pytest.raises(InvalidData):
        check_response(path, 200, body, api=openapi_of(_as_before()))


def test_a_wrong_answer_is_still_refused() -> None:
    with pytest.raises(InvalidData):
        check_response(ANSWERS[1][0], 200, {**REFUSED_TURN, "state": "lost"})
    with pytest.raises(InvalidData):
        check_response(ANSWERS[0][0], 200, {**QUOTA, "blocked": {"bucket": "total"}})
    with pytest.raises(AssertionError):  # an undocumented path answers 404/405 with an Error body
        check_response("/nowhere", 200, {"status": "ok"})
