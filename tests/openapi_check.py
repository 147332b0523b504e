"""Every read API response the integration tests see is checked against docs/openapi.yaml with
openapi-core (docs/contract.md, "Read API"): the tests' HTTP clients call `check_response` (or
`read_checked`) on each answer, so a route that answers something the document does not allow
fails the test that saw it. Paths the document does not list (the API answers them 404 or 405)
must still carry its `Error` body."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import jsonschema
import yaml
from openapi_core import OpenAPI
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.testing import MockRequest, MockResponse

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
HOST = "http://minichat.test"


@cache
def _document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return loaded


@cache
def _api() -> OpenAPI:
    return OpenAPI.from_dict(_document())


def openapi_of(document: dict[str, Any]) -> OpenAPI:
    """An `OpenAPI` of another document (a test shows what an older document made of a response)."""
    return OpenAPI.from_dict(document)


def check_response(
    target: str,
    status: int,
    body: Any,
    *,
    method: str = "get",
    content_type: str = "application/json",
    api: OpenAPI | None = None,
) -> None:
    """Raise when the response (`body` as decoded JSON, or text for a non-JSON type) to `method
    target` (a path with its query, or a full URL) is not one the document allows."""
    parts = urlsplit(target)
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = MockRequest(HOST, method, parts.path, args=dict(parse_qsl(parts.query)))
    response = MockResponse(data, status_code=status, content_type=content_type)
    try:
        (api or _api()).validate_response(request, response)
    except PathNotFound:
        # Not a documented path: the API answers 404 (405 for another method) with its Error body.
        assert status in (404, 405), (target, status)
        jsonschema.validate(body, _document()["components"]["schemas"]["Error"])
    except OperationNotFound:
        # A documented path with a method it does not have: 405, with the Error body.
        assert status == 405, (method, target, status)
        jsonschema.validate(body, _document()["components"]["schemas"]["Error"])


async def read_checked(response: aiohttp.ClientResponse) -> Any:
    """The response's JSON (or text, for /metrics), after checking it against the document."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type == "application/json":
        body: Any = await response.json(content_type=None)
    else:
        body = await response.text()
    check_response(
        str(response.url.path_qs), response.status, body, method=response.method, content_type=content_type
    )
    return body
