"""Where a partition resumes (`processors/resume.py`): the stored position, or lower where outputs
may not have been acknowledged."""

from __future__ import annotations

from minichat.processors.resume import acknowledged, resume_offset


def test_without_kafka_offsets_the_acknowledged_offset_kept_in_postgresql_counts() -> None:
    # the group's offsets expired (offsets.retention.minutes): not the log's beginning
    assert resume_offset(40, acknowledged(None, 40), 0) == 40
    assert resume_offset(40, acknowledged(None, 37), 0) == 37
    assert acknowledged(30, 37) == 37 and acknowledged(38, 37) == 38


def test_nothing_known_acknowledged_re_runs_from_the_beginning() -> None:
    # a crash between the first commit and its produce: those decisions must still go out
    assert acknowledged(None, None) is None
    assert resume_offset(40, None, 5) == 5


def test_a_lower_acknowledged_offset_re_sends_what_may_not_have_gone_out() -> None:
    assert resume_offset(40, 35, 0) == 35
    assert resume_offset(40, 3, 10) == 10  # never below what the log still holds


def test_a_higher_committed_offset_never_skips_records_not_applied() -> None:
    assert resume_offset(40, 90, 0) == 40
