"""The watchdog's events decode as the agents decode their topics, with stable ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from minichat.domain.ids import ID_NAMESPACE, grace_expired_event_id, orphaned_event_id, turn_id_for
from minichat.models.events import TurnOrphaned, UsageGraceExpired, decode_provider_event, decode_usage_event
from minichat.models.events import to_json_bytes as encode
from minichat.processors.watchdog import grace_expired_event, orphaned_event
from minichat.storage.watchdog import StaleTurn

NOW = datetime(2026, 3, 14, 9, 26, 53, 589_793, tzinfo=UTC)


def stale_turn(progress_seq: int = 7) -> StaleTurn:
    chat, request = uuid.uuid4(), uuid.uuid4()
    return StaleTurn(turn_id_for(chat, request), uuid.uuid4(), chat, request, progress_seq, NOW)


def test_orphaned_event_round_trips_through_the_provider_decoder() -> None:
    turn = stale_turn(progress_seq=7)
    event = orphaned_event(turn)
    decoded = decode_provider_event(str(turn.chat_id).encode(), encode(event))
    assert decoded == event
    assert isinstance(decoded, TurnOrphaned)
    assert (decoded.tenant_id, decoded.chat_id, decoded.request_id) == (
        turn.tenant_id,
        turn.chat_id,
        turn.request_id,
    )
    assert decoded.progress_seq == 7
    assert decoded.occurred_at == NOW


def test_grace_expired_event_round_trips_through_the_usage_decoder() -> None:
    turn = stale_turn()
    event = grace_expired_event(turn)
    decoded = decode_usage_event(str(turn.chat_id).encode(), encode(event))
    assert decoded == event
    assert isinstance(decoded, UsageGraceExpired)
    assert decoded.request_id == turn.request_id


def test_event_ids_are_uuid5_of_the_turn_and_progress() -> None:
    turn = stale_turn(progress_seq=2)
    assert orphaned_event(turn).event_id == orphaned_event_id(turn.id, 2)
    assert orphaned_event_id(turn.id, 2) == uuid.uuid5(ID_NAMESPACE, f"turn.orphaned:{turn.id}:2")
    assert orphaned_event_id(turn.id, 2) != orphaned_event_id(turn.id, 3)
    assert grace_expired_event(turn).event_id == grace_expired_event_id(turn.id)
    assert grace_expired_event_id(turn.id) == uuid.uuid5(ID_NAMESPACE, f"usage.grace_expired:{turn.id}")
    assert orphaned_event_id(turn.id, 0).version == grace_expired_event_id(turn.id).version == 5
