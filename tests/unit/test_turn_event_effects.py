"""A batch's writes for provider and usage events, folded in memory (processors.turn_events):
a turn completed and reported in one batch inserts its assistant message with the usage, instead
of inserting it and updating it in the same transaction; the stored rows are the same."""

from __future__ import annotations

from minichat.domain.settlement import UsageFigures
from minichat.processors.turn_events import _add_step, _Effects
from tests.unit.builders import completed, reported
from tests.unit.test_domain_turns import POLICY, TURN_ID, play, running_turn


def figures(message_usage: UsageFigures | None) -> tuple[int, int] | None:
    return None if message_usage is None else (message_usage.input_tokens, message_usage.output_tokens)


def test_completed_then_reported_in_one_batch_inserts_the_message_with_its_usage() -> None:
    steps = play(running_turn(), completed("hi"), reported(800, 200))
    effects = _Effects()
    for step in steps:
        _add_step(effects, TURN_ID.int, step, POLICY)
    [message] = effects.messages.values()
    assert figures(message.usage) == (800, 200) == figures(steps[-1].turn.usage)
    assert effects.message_usage == {}  # nothing left to update
    assert effects.turns[TURN_ID.int].turn == steps[-1].turn  # and the turn is written as it ends up


def test_a_report_for_a_message_stored_earlier_updates_it() -> None:
    first, second = play(running_turn(), completed("hi"), reported(800, 200))
    earlier, effects = _Effects(), _Effects()
    _add_step(earlier, TURN_ID.int, first, POLICY)  # an earlier batch inserted the message, without usage
    assert figures(earlier.messages[TURN_ID.int].usage) is None
    _add_step(effects, TURN_ID.int, second, POLICY)
    assert effects.messages == {}
    assert figures(effects.message_usage[TURN_ID.int].usage) == (800, 200)


def test_zeros_then_a_real_report_in_one_batch_leave_the_real_figures() -> None:
    steps = play(running_turn(), completed("hi"), reported(0, 0), reported(800, 200), policy=POLICY)
    effects = _Effects()
    for step in steps:
        _add_step(effects, TURN_ID.int, step, POLICY)
    assert figures(effects.messages[TURN_ID.int].usage) == (800, 200)
    assert effects.message_usage == {}
