# ruff: noqa: E501  (the corpus is a table: one record per entry, read across)
"""Hostile and broken input records, each with the outcome the processor must produce.

`tests/integration/test_hostile_input.py` produces every record of `CORPUS` between valid traffic on
the three input topics, through a live worker, and checks the outcomes table-driven. A record is
built from a `Scene` (the ids of the tenants and chats it attacks), so the same corpus serves every
run. Every record that carries text carries `MARKER`, which must never come back in a dead
letter's `error_detail` (nor in a log).

Outcomes:
* `DeadLettered(code, detail)`: exactly one dead letter for the record, with that `error_code`
  and (when given) `detail` as a substring of its `error_detail`;
* `Rejected(code)`: decoded and answered by a `turn.decision` rejecting it with that `error_code`;
* `Ignored()`: decoded and applied, changing nothing (no dead letter, no decision).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from minichat.models.events import MAX_PAYLOAD_BYTES, DeadLetterCode, DecisionErrorCode

MARKER = "HOSTILE-MARKER-5e1d"
"""In the content of every record: message content never appears in an error_detail or a log."""

TopicKind = Literal["turn-requests", "provider-responses", "usage"]
Event = dict[str, Any]


@dataclass(frozen=True)
class DeadLettered:
    code: DeadLetterCode
    detail: str | None = None


@dataclass(frozen=True)
class Rejected:
    code: DecisionErrorCode


@dataclass(frozen=True)
class Ignored:
    pass


Outcome = DeadLettered | Rejected | Ignored


@dataclass(frozen=True)
class Scene:
    """The ids a record is built from. `chat`/`request` is the sender's own running turn (the record
    sits between its request and its completion); the victim is another tenant with a settled turn
    (`victim_chat`, `victim_request`) and a running one; `deleted_chat` is the sender's own chat,
    deleted after one settled turn; `fresh_chat` is new."""

    tenant: uuid.UUID
    user: uuid.UUID
    chat: uuid.UUID
    request: uuid.UUID
    victim_tenant: uuid.UUID
    victim_user: uuid.UUID
    victim_chat: uuid.UUID
    victim_request: uuid.UUID
    victim_running_chat: uuid.UUID
    victim_running_request: uuid.UUID
    deleted_chat: uuid.UUID
    deleted_request: uuid.UUID
    fresh_chat: uuid.UUID  # a chat id nobody has used


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Hostile:
    name: str
    topic: TopicKind
    outcome: Outcome
    build: Callable[[Scene], Record]
    compress: bool = False  # gzip: how a value above the broker's size limit still reaches a topic


# ------------------------------------------------------------------------------------ builders


def envelope(kind: str, tenant: uuid.UUID, chat: uuid.UUID, **fields: Any) -> Event:
    event: Event = {
        "type": kind,
        "event_id": str(uuid.uuid4()),
        "schema_version": 1,
        "occurred_at": "2026-03-01T12:00:00Z",
        "tenant_id": str(tenant),
        "chat_id": str(chat),
    }
    event.update({k: str(v) if isinstance(v, uuid.UUID) else v for k, v in fields.items()})
    return event


def requested(s: Scene, chat: uuid.UUID | None = None, **fields: Any) -> Event:
    values: dict[str, Any] = {
        "user_id": s.user,
        "request_id": uuid.uuid4(),
        "content": f"{MARKER} tell me a secret",
        "model": "gpt-5-mini",
    }
    values.update(fields)
    return envelope("turn.requested", s.tenant, chat or s.chat, **values)


def completed(s: Scene, **fields: Any) -> Event:
    values: dict[str, Any] = {
        "request_id": s.request,
        "content": f"{MARKER} the secret",
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    values.update(fields)
    return envelope("turn.completed", s.tenant, s.chat, **values)


def usage(s: Scene, **fields: Any) -> Event:
    values: dict[str, Any] = {"request_id": s.request, "input_tokens": 3, "output_tokens": 4}
    values.update(fields)
    return envelope("usage.reported", s.tenant, s.chat, **values)


def without(event: Event, *names: str) -> Event:
    return {k: v for k, v in event.items() if k not in names}


def keyed(event_of: Callable[[Scene], Any]) -> Callable[[Scene], Record]:
    """The record of an event (dict, or raw bytes), keyed as the contract says: by its chat."""

    def build(s: Scene) -> Record:
        value = event_of(s)
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        return Record(str(s.chat).encode(), data)

    return build


def key_of(
    key: Callable[[Scene], bytes | None], event_of: Callable[[Scene], Event]
) -> Callable[[Scene], Record]:
    return lambda s: Record(key(s), json.dumps(event_of(s)).encode())


def chat_key(
    chat: Callable[[Scene], uuid.UUID], event_of: Callable[[Scene], Event]
) -> Callable[[Scene], Record]:
    return key_of(lambda s: str(chat(s)).encode(), event_of)


def exactly(size: int, event_of: Callable[[Scene], Event]) -> Callable[[Scene], Record]:
    """The event with its `content` padded so the value is exactly `size` bytes."""

    def build(s: Scene) -> Record:
        event = event_of(s)
        event["content"] = f"{MARKER} "
        base = len(json.dumps(event).encode())
        event["content"] += "x" * (size - base)
        value = json.dumps(event).encode()
        assert len(value) == size
        return Record(str(event["chat_id"]).encode(), value)

    return build


def nested(depth: int) -> Callable[[Scene], bytes]:
    def value(s: Scene) -> bytes:
        return (
            json.dumps({**requested(s), "extra": "@"}).encode().replace(b'"@"', b"[" * depth + b"]" * depth)
        )

    return value


def replace_content(raw: bytes) -> Callable[[Scene], bytes]:
    """A turn.requested whose content string is given as raw bytes (inside the quotes)."""

    def value(s: Scene) -> bytes:
        return json.dumps(requested(s, content="@@")).encode().replace(b'"@@"', b'"' + raw + b'"')

    return value


def victim_turn(kind: str, running: bool, **fields: Any) -> Callable[[Scene], Record]:
    """A provider/usage event of the sender's tenant naming the victim's turn."""

    def build(s: Scene) -> Record:
        chat = s.victim_running_chat if running else s.victim_chat
        request = s.victim_running_request if running else s.victim_request
        event = envelope(kind, s.tenant, chat, request_id=request, **fields)
        return Record(str(chat).encode(), json.dumps(event).encode())

    return build


def command(
    kind: str, chat: Callable[[Scene], uuid.UUID], **fields: Callable[[Scene], Any]
) -> Callable[[Scene], Record]:
    """A command of the sender's tenant and user on `chat` (someone else's, or a deleted one)."""

    def build(s: Scene) -> Record:
        values = {name: make(s) for name, make in fields.items()}
        event = envelope(kind, s.tenant, chat(s), user_id=s.user, **values)
        return Record(str(chat(s)).encode(), json.dumps(event).encode())

    return build


def new_id(s: Scene) -> uuid.UUID:
    return uuid.uuid4()


def text(s: Scene) -> str:
    return f"{MARKER} edited"


def victims(s: Scene) -> uuid.UUID:
    return s.victim_chat


def deleted(s: Scene) -> uuid.UUID:
    return s.deleted_chat


TOO_LARGE = 2 * 1024 * 1024


# ------------------------------------------------------------------------------------ the corpus

S: Final[DeadLetterCode] = "schema_violation"
M: Final[DeadLetterCode] = "malformed_json"
U: Final[DeadLetterCode] = "unknown_type"
K: Final[DeadLetterCode] = "key_mismatch"
T: Final[DeadLetterCode] = "tenant_mismatch"
L: Final[DeadLetterCode] = "payload_too_large"

# fmt: off

CORPUS: tuple[Hostile, ...] = (
    # ---- turn-requests: not JSON, not UTF-8, not an object
    Hostile("tr/truncated-json", "turn-requests", DeadLettered(M, "Invalid JSON"),
            keyed(lambda s: f'{{"type": "turn.requested", "content": "{MARKER}'.encode())),
    Hostile("tr/plain-text", "turn-requests", DeadLettered(M), keyed(lambda s: f"{MARKER} hello".encode())),
    Hostile("tr/empty-value", "turn-requests", DeadLettered(M), keyed(lambda s: b"")),
    Hostile("tr/tombstone", "turn-requests", DeadLettered(M), lambda s: Record(str(s.chat).encode(), None)),
    Hostile("tr/invalid-utf8", "turn-requests", DeadLettered(M, "not valid UTF-8"),
            keyed(replace_content(MARKER.encode() + b" \xff\xfe"))),
    Hostile("tr/encoded-surrogate", "turn-requests", DeadLettered(M, "not valid UTF-8"),
            keyed(replace_content(MARKER.encode() + b" \xed\xa0\x80"))),
    Hostile("tr/lone-surrogate-escape", "turn-requests", DeadLettered(M, "surrogate"),
            keyed(replace_content(MARKER.encode() + b" \\udc00"))),
    Hostile("tr/json-array", "turn-requests", DeadLettered(M, "not a JSON object"), keyed(lambda s: [requested(s)])),
    Hostile("tr/json-string", "turn-requests", DeadLettered(M, "not a JSON object"), keyed(lambda s: MARKER)),
    Hostile("tr/json-null", "turn-requests", DeadLettered(M, "not a JSON object"), keyed(lambda s: b"null")),
    Hostile("tr/raw-nul-byte", "turn-requests", DeadLettered(M, "control character"),
            keyed(replace_content(MARKER.encode() + b" \x00 after"))),
    Hostile("tr/deep-nesting", "turn-requests", DeadLettered(M, "recursion limit"), keyed(nested(100_000))),
    # ---- turn-requests: JSON, but not the schema
    Hostile("tr/escaped-nul-in-content", "turn-requests", DeadLettered(S, "content"),
            keyed(lambda s: requested(s, content=f"{MARKER}\u0000after"))),
    Hostile("tr/nul-in-title", "turn-requests", DeadLettered(S, "title"),
            keyed(lambda s: requested(s, title=f"{MARKER}\u0000"))),
    Hostile("tr/content-is-an-object", "turn-requests", DeadLettered(S, "content"),
            keyed(lambda s: requested(s, content={"text": MARKER, "deep": [[[MARKER]]]}))),
    Hostile("tr/image-count-string", "turn-requests", DeadLettered(S, "image_count"),
            keyed(lambda s: requested(s, image_count="3"))),
    Hostile("tr/image-count-float", "turn-requests", DeadLettered(S, "image_count"),
            keyed(lambda s: requested(s, image_count=1.0))),
    Hostile("tr/image-count-huge", "turn-requests", DeadLettered(S, "image_count"),
            keyed(lambda s: requested(s, image_count=2**40))),
    Hostile("tr/web-search-int", "turn-requests", DeadLettered(S, "web_search"),
            keyed(lambda s: requested(s, web_search=1))),
    Hostile("tr/schema-version-bool", "turn-requests", DeadLettered(S, "schema_version"),
            keyed(lambda s: {**requested(s), "schema_version": True})),
    Hostile("tr/schema-version-2", "turn-requests", DeadLettered(S, "schema_version"),
            keyed(lambda s: {**requested(s), "schema_version": 2})),
    Hostile("tr/user-id-not-uuid", "turn-requests", DeadLettered(S, "user_id"),
            keyed(lambda s: requested(s, user_id=MARKER))),
    Hostile("tr/requester-type-unknown", "turn-requests", DeadLettered(S, "requester_type"),
            keyed(lambda s: requested(s, requester_type=f"{MARKER}-admin"))),
    Hostile("tr/title-too-long", "turn-requests", DeadLettered(S, "title"),
            keyed(lambda s: requested(s, title=MARKER * 20))),
    Hostile("tr/type-is-a-number", "turn-requests", DeadLettered(S, "type"),
            keyed(lambda s: {**requested(s), "type": 42})),
    Hostile("tr/missing-type", "turn-requests", DeadLettered(S, "type: Field required"),
            keyed(lambda s: without(requested(s), "type"))),
    Hostile("tr/missing-request-id", "turn-requests", DeadLettered(S, "request_id: Field required"),
            keyed(lambda s: without(requested(s), "request_id"))),
    Hostile("tr/missing-tenant", "turn-requests", DeadLettered(S, "tenant_id: Field required"),
            keyed(lambda s: without(requested(s), "tenant_id"))),
    Hostile("tr/missing-content", "turn-requests", DeadLettered(S, "content: Field required"),
            keyed(lambda s: without(requested(s), "content"))),
    Hostile("tr/unknown-type", "turn-requests", DeadLettered(U, "'turn.explode'"),
            keyed(lambda s: {**requested(s), "type": "turn.explode"})),
    Hostile("tr/unknown-type-with-content", "turn-requests", DeadLettered(U, "characters"),
            keyed(lambda s: {**requested(s), "type": f"{MARKER} please"})),
    Hostile("tr/provider-event-on-wrong-topic", "turn-requests", DeadLettered(U, "'turn.completed'"),
            keyed(completed)),
    Hostile("tr/usage-event-on-wrong-topic", "turn-requests", DeadLettered(U, "'usage.reported'"),
            keyed(usage)),
    # ---- turn-requests: the key is not the chat
    Hostile("tr/uppercase-key", "turn-requests", DeadLettered(K),
            key_of(lambda s: str(s.chat).upper().encode(), requested)),
    Hostile("tr/other-chat-key", "turn-requests", DeadLettered(K),
            key_of(lambda s: str(uuid.uuid4()).encode(), requested)),
    Hostile("tr/null-key", "turn-requests", DeadLettered(K, "null"), key_of(lambda s: None, requested)),
    Hostile("tr/victims-chat-as-key", "turn-requests", DeadLettered(K),
            key_of(lambda s: str(s.victim_chat).encode(), requested)),
    # ---- turn-requests: size
    Hostile("tr/2-MiB", "turn-requests", DeadLettered(L, str(MAX_PAYLOAD_BYTES)),
            exactly(TOO_LARGE, requested), compress=True),
    Hostile("tr/limit-plus-one-byte", "turn-requests", DeadLettered(L, str(MAX_PAYLOAD_BYTES + 1)),
            exactly(MAX_PAYLOAD_BYTES + 1, requested), compress=True),
    # exactly at the limit: decoded and decided (and too long for the model)
    Hostile("tr/exactly-the-limit", "turn-requests", Rejected("input_too_long"),
            exactly(MAX_PAYLOAD_BYTES, lambda s: requested(s, chat=s.fresh_chat, model="gpt-5-nano")),
            compress=True),
    # ---- turn-requests: another tenant's chat, a deleted chat
    Hostile("tr/foreign-chat-requested", "turn-requests", Rejected("chat_not_found"),
            chat_key(victims, lambda s: requested(s, chat=s.victim_chat))),
    Hostile("tr/foreign-chat-victims-request-id", "turn-requests", Rejected("chat_not_found"),
            chat_key(victims, lambda s: requested(s, chat=s.victim_chat, request_id=s.victim_request))),
    Hostile("tr/foreign-chat-victims-user", "turn-requests", Rejected("chat_not_found"),
            chat_key(victims, lambda s: requested(s, chat=s.victim_chat, user_id=s.victim_user))),
    Hostile("tr/foreign-chat-retry", "turn-requests", Rejected("chat_not_found"),
            command("turn.retry", victims, request_id=lambda s: s.victim_request, new_request_id=new_id)),
    Hostile("tr/foreign-chat-edit", "turn-requests", Rejected("chat_not_found"),
            command("turn.edit", victims, request_id=lambda s: s.victim_request, new_request_id=new_id,
                    content=text)),
    Hostile("tr/foreign-chat-turn-delete", "turn-requests", Rejected("chat_not_found"),
            command("turn.delete", victims, request_id=lambda s: s.victim_request)),
    Hostile("tr/foreign-chat-delete", "turn-requests", Rejected("chat_not_found"), command("chat.delete", victims)),
    Hostile("tr/deleted-chat-requested", "turn-requests", Rejected("chat_not_found"),
            chat_key(deleted, lambda s: requested(s, chat=s.deleted_chat))),
    Hostile("tr/deleted-chat-retry", "turn-requests", Rejected("chat_not_found"),
            command("turn.retry", deleted, request_id=lambda s: s.deleted_request, new_request_id=new_id)),
    Hostile("tr/deleted-chat-edit", "turn-requests", Rejected("chat_not_found"),
            command("turn.edit", deleted, request_id=lambda s: s.deleted_request, new_request_id=new_id,
                    content=text)),
    Hostile("tr/deleted-chat-turn-delete", "turn-requests", Rejected("chat_not_found"),
            command("turn.delete", deleted, request_id=lambda s: s.deleted_request)),
    Hostile("tr/deleted-chat-delete-again", "turn-requests", Rejected("chat_not_found"),
            command("chat.delete", deleted)),
    # ---- provider-responses
    Hostile("pr/truncated-json", "provider-responses", DeadLettered(M),
            keyed(lambda s: json.dumps(completed(s)).encode()[:-7])),
    Hostile("pr/json-array", "provider-responses", DeadLettered(M, "not a JSON object"),
            keyed(lambda s: [completed(s)])),
    Hostile("pr/float-tokens", "provider-responses", DeadLettered(S, "usage.input_tokens"),
            keyed(lambda s: completed(s, usage={"input_tokens": 5.0, "output_tokens": 1}))),
    Hostile("pr/negative-tokens", "provider-responses", DeadLettered(S, "usage.output_tokens"),
            keyed(lambda s: completed(s, usage={"input_tokens": 5, "output_tokens": -1}))),
    Hostile("pr/huge-tokens", "provider-responses", DeadLettered(S, "usage.output_tokens"),
            keyed(lambda s: completed(s, usage={"input_tokens": 5, "output_tokens": 10_000_001}))),
    Hostile("pr/bool-tokens", "provider-responses", DeadLettered(S, "usage.input_tokens"),
            keyed(lambda s: completed(s, usage={"input_tokens": True, "output_tokens": 1}))),
    Hostile("pr/escaped-nul-in-content", "provider-responses", DeadLettered(S, "content"),
            keyed(lambda s: completed(s, content=f"{MARKER}\u0000"))),
    Hostile("pr/missing-request-id", "provider-responses", DeadLettered(S, "request_id: Field required"),
            keyed(lambda s: without(completed(s), "request_id"))),
    Hostile("pr/finish-reason-unknown", "provider-responses", DeadLettered(S, "finish_reason"),
            keyed(lambda s: completed(s, finish_reason=MARKER))),
    Hostile("pr/command-on-wrong-topic", "provider-responses", DeadLettered(U, "'turn.requested'"),
            keyed(requested)),
    Hostile("pr/usage-event-on-wrong-topic", "provider-responses", DeadLettered(U, "'usage.reported'"),
            keyed(usage)),
    Hostile("pr/uppercase-key", "provider-responses", DeadLettered(K),
            key_of(lambda s: str(s.chat).upper().encode(), completed)),
    Hostile("pr/null-key", "provider-responses", DeadLettered(K, "null"), key_of(lambda s: None, completed)),
    Hostile("pr/2-MiB", "provider-responses", DeadLettered(L), exactly(TOO_LARGE, completed), compress=True),
    Hostile("pr/foreign-running-turn-completed", "provider-responses", DeadLettered(T),
            victim_turn("turn.completed", True, content=f"{MARKER} forged answer")),
    Hostile("pr/foreign-running-turn-progress", "provider-responses", DeadLettered(T),
            victim_turn("turn.progress", True)),
    Hostile("pr/foreign-running-turn-failed", "provider-responses", DeadLettered(T),
            victim_turn("turn.failed", True, error_code="provider_error", error_detail=MARKER)),
    Hostile("pr/foreign-settled-turn-cancelled", "provider-responses", DeadLettered(T),
            victim_turn("turn.cancelled", False, content=MARKER, usage={"input_tokens": 9, "output_tokens": 9})),
    Hostile("pr/deleted-chat-completed-again", "provider-responses", Ignored(),
            lambda s: Record(
                str(s.deleted_chat).encode(),
                json.dumps(envelope("turn.completed", s.tenant, s.deleted_chat, request_id=s.deleted_request,
                                    content=f"{MARKER} late", usage={"input_tokens": 1, "output_tokens": 1})
                           ).encode(),
            )),
    # ---- usage
    Hostile("us/negative", "usage", DeadLettered(S, "input_tokens"), keyed(lambda s: usage(s, input_tokens=-1))),
    Hostile("us/huge", "usage", DeadLettered(S, "input_tokens"),
            keyed(lambda s: usage(s, input_tokens=10_000_001))),
    Hostile("us/float", "usage", DeadLettered(S, "output_tokens"), keyed(lambda s: usage(s, output_tokens=4.0))),
    Hostile("us/string", "usage", DeadLettered(S, "output_tokens"), keyed(lambda s: usage(s, output_tokens="4"))),
    Hostile("us/bool", "usage", DeadLettered(S, "reasoning_tokens"),
            keyed(lambda s: usage(s, reasoning_tokens=False))),
    Hostile("us/exponent", "usage", DeadLettered(S, "input_tokens"),
            keyed(lambda s: json.dumps(usage(s)).encode().replace(b'"input_tokens": 3', b'"input_tokens": 1e400'))),
    Hostile("us/int64-overflow", "usage", DeadLettered(S, "input_tokens"),
            keyed(lambda s: usage(s, input_tokens=2**70))),
    Hostile("us/missing-output", "usage", DeadLettered(S, "output_tokens: Field required"),
            keyed(lambda s: without(usage(s), "output_tokens"))),
    Hostile("us/invalid-utf8", "usage", DeadLettered(M, "not valid UTF-8"),
            keyed(lambda s: json.dumps(usage(s, model="@@")).encode().replace(b"@@", b"\xc3\x28"))),
    Hostile("us/json-array", "usage", DeadLettered(M), keyed(lambda s: [usage(s)])),
    Hostile("us/unknown-type", "usage", DeadLettered(U), keyed(lambda s: {**usage(s), "type": "usage.refund"})),
    Hostile("us/provider-event-on-wrong-topic", "usage", DeadLettered(U), keyed(completed)),
    Hostile("us/null-key", "usage", DeadLettered(K), key_of(lambda s: None, usage)),
    Hostile("us/other-chat-key", "usage", DeadLettered(K), key_of(lambda s: str(uuid.uuid4()).encode(), usage)),
    Hostile("us/foreign-settled-turn", "usage", DeadLettered(T),
            victim_turn("usage.reported", False, input_tokens=9_000_000, output_tokens=9_000_000)),
    Hostile("us/foreign-running-turn", "usage", DeadLettered(T),
            victim_turn("usage.reported", True, input_tokens=1, output_tokens=1)),
)


# Values wider than the column that stores them, or than the record that echoes them. The decoder
# accepts them today; the batch's insert (or the decision's produce) then fails, the worker stops,
# and the partition is stuck on the record: see test_hostile_input.py.
FIELD_WIDTHS: tuple[Hostile, ...] = (
    Hostile("width/new-chat-model-1025", "turn-requests", DeadLettered(S, "model"),
            chat_key(lambda s: s.fresh_chat, lambda s: requested(s, chat=s.fresh_chat, model="m" * 1025))),
    Hostile("width/provider-response-id-129", "provider-responses", DeadLettered(S, "provider_response_id"),
            keyed(lambda s: completed(s, provider_response_id="r" * 129))),
    Hostile("width/error-code-65", "provider-responses", DeadLettered(S, "error_code"),
            keyed(lambda s: envelope("turn.failed", s.tenant, s.chat, request_id=s.request, error_code="e" * 65))),
    Hostile("width/usage-model-1025", "usage", DeadLettered(S, "model"),
            keyed(lambda s: usage(s, model="m" * 1025))),
    # stored nowhere (someone else's chat), but echoed as `selected_model` in the decision, which
    # is then larger than the worker's producer and the broker accept
    Hostile("width/model-echoed-into-a-1MB-decision", "turn-requests", DeadLettered(S, "model"),
            keyed(lambda s: requested(s, user_id=uuid.uuid4(), model="m" * 1_000_000))),
)
# fmt: on


def dead_letter_payload(value: bytes | None) -> tuple[str, str, bool]:
    """(payload, payload_encoding, payload_truncated) the contract prescribes for a record value."""
    import base64

    raw = value or b""
    head = raw[:65_536]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(head).decode("ascii"), "base64", len(raw) > 65_536
    return head.decode("utf-8", errors="ignore"), "utf-8", len(raw) > 65_536
