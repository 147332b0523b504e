"""`minichat.client`'s surface as a gateway writes against it: ids as UUIDs or their text (a
malformed one named), and the contract's codes as constants."""

from __future__ import annotations

import uuid

import pytest

from minichat.client import FailureCode, RejectCode, as_uuid, envelope
from minichat.domain.settlement import ORPHAN_TIMEOUT, RELEASED_CODES, USAGE_CODES
from minichat.models.events.vocabulary import DECISION_ERROR_CODES
from tests.unit.markdown import DOCS, Document, names

CONTRACT = Document.read(DOCS / "contract.md")


def test_failure_codes_are_the_contracts_and_the_settlements() -> None:
    assert set(FailureCode) == set(names(CONTRACT.section("Failure codes").table()))
    assert set(FailureCode) == {ORPHAN_TIMEOUT, *RELEASED_CODES, *USAGE_CODES}
    assert FailureCode.CONTEXT_LENGTH_EXCEEDED == "context_length_exceeded"  # a str where one is taken


def test_reject_codes_are_the_contracts_and_the_decisions() -> None:
    assert set(RejectCode) == set(names(CONTRACT.section("Decision error codes").table()))
    assert set(RejectCode) == set(DECISION_ERROR_CODES)


def test_ids_may_be_uuids_or_their_text() -> None:
    tenant, chat = uuid.uuid4(), uuid.uuid4()
    made = envelope(str(tenant), chat)
    assert (made["tenant_id"], made["chat_id"]) == (tenant, chat)
    assert as_uuid("chat_id", str(chat).upper()) == chat


@pytest.mark.parametrize("bad", ["chat-1", "", 42, None])
def test_a_malformed_id_is_named_in_one_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^user_id must be a UUID or its text, got "):
        as_uuid("user_id", bad)  # type: ignore[arg-type]
