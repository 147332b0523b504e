"""Where a partition resumes (`processors/resume.py`): the stored position, or lower where outputs
may not have been acknowledged."""

from __future__ import annotations

from minichat.processors.resume import acknowledged, ahead_of_group, resume_at, resume_offset


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


def test_an_offset_acknowledged_only_in_postgresql_is_committed_to_the_group() -> None:
    # a rebalance landed the last batch's outputs without a commit; the next owner resumes past
    # it and gets no new record: without this commit the group's lag stays 1 for ever
    start, done = resume_at(41, 40, 41, 0)
    assert (start, done) == (41, 41)
    assert ahead_of_group({"a": start, "b": 7, "c": 3}, {"a": 40, "b": 7, "c": None}) == {"a": 41, "c": 3}


def test_nothing_is_committed_that_the_group_already_has_or_passed() -> None:
    start, _ = resume_at(40, 90, None, 0)  # a higher committed offset: resume at the stored one
    assert ahead_of_group({"a": start}, {"a": 90}) == {}
    assert ahead_of_group({"a": 0}, {"a": None}) == {}
