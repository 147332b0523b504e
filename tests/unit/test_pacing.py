"""What waits in the engine's lanes stays bounded, and a partition set never waits on a lane that
is paused and empty (processors.pacing, pure)."""

from __future__ import annotations

import random

from minichat.processors.pacing import pacing

REQ, RESP, USAGE = ("turn-requests", 0), ("provider-responses", 0), ("usage", 0)
MOST, BUDGET = 10, 1000


def test_a_full_lane_pauses_and_resumes_half_drained() -> None:
    assert pacing({REQ: (10, 100), USAGE: (0, 0)}, set(), MOST, BUDGET) == ([REQ], [])
    assert pacing({REQ: (6, 60), USAGE: (0, 0)}, {REQ}, MOST, BUDGET) == ([], [])
    assert pacing({REQ: (4, 40), USAGE: (0, 0)}, {REQ}, MOST, BUDGET) == ([], [REQ])


def test_the_byte_budget_pauses_every_lane_with_records_but_no_empty_one() -> None:
    lanes = {REQ: (2, 900), RESP: (0, 0), USAGE: (1, 100)}
    assert pacing(lanes, set(), MOST, BUDGET) == ([REQ, USAGE], [])


def test_an_emptied_lane_resumes_while_the_rest_of_its_set_holds_the_budget() -> None:
    # The stall: usage was paused with records, its records left in a batch, and turn-requests
    # holds more than half the budget behind usage's next record. Waiting for the budget to drain
    # would wait for ever: those bytes leave only after usage's next record came.
    lanes = {REQ: (3, 900), RESP: (0, 0), USAGE: (0, 0)}
    assert pacing(lanes, {REQ, USAGE}, MOST, BUDGET) == ([], [USAGE])


def test_no_paused_lane_is_empty_after_pacing_and_the_bound_holds() -> None:
    rng = random.Random(3)
    lanes_keys = [(topic, p) for topic in ("a", "b", "c") for p in range(4)]
    for _ in range(2000):
        lanes = {
            lane: (n, n * rng.randint(1, 200)) if (n := rng.choice([0, 0, 1, 4, 9, 10, 30])) else (0, 0)
            for lane in lanes_keys
        }
        paused = {lane for lane in lanes_keys if rng.random() < 0.5}
        pause, resume = pacing(lanes, paused, MOST, BUDGET)
        after = (paused | set(pause)) - set(resume)
        assert not set(pause) & paused and set(resume) <= paused
        assert all(lanes[lane][0] > 0 for lane in after)  # nobody waits on a paused empty lane
        total = sum(b for _, b in lanes.values())
        for lane in set(lanes_keys) - paused:  # a lane that was fetching stops at either bound
            size = lanes[lane][0]
            assert (lane in pause) == (size >= MOST or (size > 0 and total >= BUDGET))
