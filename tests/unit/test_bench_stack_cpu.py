"""The bench's share of the machine per service: what each used between two readings."""

from __future__ import annotations

from minichat.bench.workers import stack_cpu_used


def test_cpu_used_per_service_between_two_readings() -> None:
    before = {"broker": {10: 5.0}, "postgres": {20: 1.0, 21: 2.0, 22: 3.0}}
    after = {"broker": {10: 7.5}, "postgres": {20: 1.5, 21: 2.0, 23: 0.25}}
    # 22 ended in between (not counted), 23 started in between (all of it counted)
    assert stack_cpu_used(before, after) == {"broker": 2.5, "postgres": 0.75}


def test_a_service_not_on_this_machine_is_none() -> None:
    nothing: dict[str, dict[int, float]] = {"broker": {}, "postgres": {}}
    assert stack_cpu_used(nothing, {"broker": {}, "postgres": {7: 1.0}}) == {"broker": None, "postgres": 1.0}
