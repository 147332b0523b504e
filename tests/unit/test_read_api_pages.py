"""The read API's cursors, page parameters and message sizes, without a server: a cursor is only
what the listing wrote, a limit only ASCII digits, and the SQL's byte estimate never exceeds what a
message's JSON takes (so SQL never cuts a page that would have fit)."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from minichat.processors.read_api import MESSAGE_FIELDS, _page, decode_cursor, dumps, encode_cursor
from minichat.storage.read_api import MESSAGE_JSON_MIN, Cursor


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_a_cursor_round_trips_in_utc() -> None:
    at = datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    cursor = Cursor(7, at, uuid.uuid4(), 1, uuid.uuid4())
    decoded = decode_cursor(encode_cursor(cursor))
    assert decoded == cursor and decoded is not None and decoded.turn_at.tzinfo == UTC


IDS = f"{uuid.uuid4()}|0|{uuid.uuid4()}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-cursor",
        _raw("1|0001-01-01T00:00+14:00|" + IDS),  # before year 1 once in UTC
        _raw("1|9999-12-31T23:59-14:00|" + IDS),  # after year 9999 once in UTC
        _raw("1|2026-01-01T00:00|" + IDS),  # no zone
        _raw(f"1|2026-01-01T00:00+00:00|{uuid.uuid4()}|3|{uuid.uuid4()}"),  # no such rank
        _raw("-1|2026-01-01T00:00+00:00|" + IDS),  # no such turn number
        _raw("01|2026-01-01T00:00+00:00|" + IDS),
        _raw("9" * 19 + "|2026-01-01T00:00+00:00|" + IDS),  # beyond bigint
        _raw("１|2026-01-01T00:00+00:00|" + IDS),  # not ASCII digits
        _raw(f"2026-01-01T00:00+00:00|{uuid.uuid4()}"),  # the shape before conversation order
        _raw("2026-01-01T00:00+00:00|" + IDS),  # the shape before turn numbers
        _raw("1|2026-01-01T00:00+00:00|" + IDS) + "!",
        "é" * 10,
        "A" * 600,
    ],
)
def test_anything_else_is_no_cursor(text: str) -> None:
    assert decode_cursor(text) is None


@pytest.mark.parametrize("limit", ["0", "501", "-1", "1_0", "１", " 5", "5 ", "1e2", "\ufffd", "99999"])
def test_a_limit_is_1_to_500_in_ascii_digits(limit: str) -> None:
    assert isinstance(_page({"limit": limit}), str)


def test_a_good_page() -> None:
    assert _page({}) == (50, None)
    assert _page({"limit": "500"}) == (500, None)


def test_the_sql_estimate_of_a_message_is_at_most_its_json() -> None:
    """`MESSAGE_JSON_MIN` + content bytes + model bytes <= the message's JSON, for the smallest
    message there is (no request, no model, short role, zero tokens) and for escapes."""
    smallest = {
        "message_id": uuid.uuid4(),
        "request_id": None,
        "role": "user",
        "content": "",
        "model": None,
        "input_tokens": 0,
        "output_tokens": 0,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    assert tuple(smallest) == MESSAGE_FIELDS
    assert len(dumps(smallest)) >= MESSAGE_JSON_MIN
    content = 'é🙂"\\\n\x00' * 100
    sized = {**smallest, "content": content, "model": "m"}
    assert len(dumps(sized)) >= MESSAGE_JSON_MIN + len(content.encode()) + 1
    assert "🙂".encode() in dumps(sized)  # UTF-8, not \\u escapes
