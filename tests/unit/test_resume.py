"""Where a partition resumes (`processors/resume.py`): the stored position, or a lower committed offset."""

from __future__ import annotations

from minichat.processors.resume import resume_offset


def test_no_committed_offset_resumes_at_the_stored_position_not_the_beginning() -> None:
    # the group's offsets expired (offsets.retention.minutes): the log's beginning would re-run it all
    assert resume_offset(40, None, 0) == 40


def test_a_lower_committed_offset_re_sends_what_may_not_have_been_acknowledged() -> None:
    assert resume_offset(40, 35, 0) == 35
    assert resume_offset(40, 3, 10) == 10  # never below what the log still holds


def test_a_higher_committed_offset_never_skips_records_not_applied() -> None:
    assert resume_offset(40, 90, 0) == 40
