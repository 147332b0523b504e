"""A small client of the read API (docs/openapi.yaml): the spend report, a turn, a user's quota.

```python
async with ReadClient("http://minichat:8080", token) as reader:
    rows = await reader.usage(date(2026, 12, 1), date(2026, 12, 31), group_by=("user", "model"))
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from types import TracebackType
from typing import Any, Literal
from uuid import UUID

import aiohttp

from minichat.client.messages import Id, as_uuid

GroupBy = Literal["user", "day", "model"]


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One group of the spend report: the keys grouped by (the others None) and its figures."""

    turns: int
    input_tokens: int
    output_tokens: int
    charged_credits_micro: int
    user_id: UUID | None = None
    day: date | None = None
    model: str | None = None


class ReadApiError(RuntimeError):
    """The read API refused the request: `status` and its `{"error", "detail"}` body."""

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else None
        super().__init__(f"read API answered {status}: {detail or body}")
        self.status, self.body = status, body


class ReadClient:
    """The read API of one tenant (its bearer token). Use as `async with`, or `close()` it."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ReadClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """The JSON body of `GET path` (200), else `ReadApiError`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = self.base_url + path
        async with self._session.get(url, params=list(params), headers=self._headers) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ReadApiError(response.status, body)
            return body

    async def usage(
        self, start: date, end: date, group_by: Sequence[GroupBy], *, user_id: Id | None = None
    ) -> list[SpendRow]:
        """`GET /v1/usage`: the spend report of UTC days `start`..`end` (both included)."""
        params = [("from", start.isoformat()), ("to", end.isoformat())]
        params += [("group_by", key) for key in group_by]
        if user_id is not None:
            params.append(("user_id", str(as_uuid("user_id", user_id))))
        body = await self.get("/v1/usage", params)
        return [
            SpendRow(
                turns=r["turns"],
                input_tokens=r["input_tokens"],
                output_tokens=r["output_tokens"],
                charged_credits_micro=r["charged_credits_micro"],
                user_id=UUID(r["user_id"]) if "user_id" in r else None,
                day=date.fromisoformat(r["day"]) if "day" in r else None,
                model=r.get("model"),
            )
            for r in body["rows"]
        ]

    async def turn(self, chat_id: Id, request_id: Id) -> Any:
        """`GET /v1/chats/{chat_id}/turns/{request_id}` as decoded JSON."""
        return await self.get(
            f"/v1/chats/{as_uuid('chat_id', chat_id)}/turns/{as_uuid('request_id', request_id)}"
        )

    async def quota(self, user_id: Id) -> Any:
        """`GET /v1/users/{user_id}/quota` as decoded JSON."""
        return await self.get(f"/v1/users/{as_uuid('user_id', user_id)}/quota")
