"""The rank pool's errors, word for word: what a failed, interrupted or hung call tells the person reading the test
report, and what it keeps for a program (mutmut found their messages unpinned)."""

from __future__ import annotations

import pytest

from fastdeploy_patch.testing import launcher
from fastdeploy_patch.testing.rank_pool import RankCallFailed, RankCallHung, RankCallInterrupted

REPORTS = {2: "rank two's tail", 0: "rank zero's tail", 1: "rank one's tail"}


def test_a_rank_that_replied_with_an_error_shows_its_traceback_then_the_others_tails() -> None:
    error = RankCallFailed(
        rank=1,
        nranks=3,
        target="tests.x:fn",
        returncode=None,
        error="Traceback: ValueError: no",
        reports=REPORTS,
        reason="rank raised",
    )
    assert str(error) == (
        "rank 1 of 3 failed in tests.x:fn: rank raised\n"
        "----- rank 1 -----\nTraceback: ValueError: no\n"
        "----- rank 0 (log tail) -----\nrank zero's tail\n"
        "----- rank 2 (log tail) -----\nrank two's tail"
    )
    assert isinstance(error, launcher.RankFailed)
    assert (error.rank, error.returncode, error.error, error.reason) == (
        1,
        None,
        "Traceback: ValueError: no",
        "rank raised",
    )
    assert error.reports == REPORTS


def test_a_rank_that_exited_shows_how_and_its_own_log_tail_first_and_when_it_happened() -> None:
    error = RankCallFailed(
        rank=2,
        nranks=3,
        target="tests.x:fn",
        returncode=-9,
        error="",
        reports=REPORTS,
        reason="rank died",
        during=" while the ranks started",
    )
    assert str(error) == (
        "rank 2 of 3 failed in tests.x:fn while the ranks started: it exited before replying, exit code -9 "
        "(SIGKILL)\n"
        "----- rank 2 -----\nrank two's tail\n"
        "----- rank 0 (log tail) -----\nrank zero's tail\n"
        "----- rank 1 (log tail) -----\nrank one's tail"
    )
    assert (error.returncode, error.error, error.reason) == (-9, "", "rank died")


def test_a_rank_that_exited_without_a_log_shows_an_empty_section() -> None:
    error = RankCallFailed(
        rank=1, nranks=2, target="m:f", returncode=3, error="", reports={0: "zero"}, reason="rank exited"
    )
    assert str(error) == (
        "rank 1 of 2 failed in m:f: it exited before replying, exit code 3\n"
        "----- rank 1 -----\n\n----- rank 0 (log tail) -----\nzero"
    )


@pytest.mark.parametrize("during", ["", " while the ranks started"])
def test_an_interrupted_call_names_the_cause_and_shows_every_ranks_stack(during: str) -> None:
    cause = KeyboardInterrupt("stop")
    error = RankCallInterrupted(nranks=3, target="m:f", cause=cause, reports=REPORTS, during=during)
    assert str(error) == (
        f"KeyboardInterrupt: stop, while 3 rank(s) ran m:f{during}; their stacks:"
        "\n----- rank 0 -----\nrank zero's tail"
        "\n----- rank 1 -----\nrank one's tail"
        "\n----- rank 2 -----\nrank two's tail"
    )
    assert (error.cause, error.reports, error.reason) == (cause, REPORTS, "interrupted")
    assert str(RankCallInterrupted(nranks=1, target="m:f", cause=cause, reports={})) == (
        "KeyboardInterrupt: stop, while 1 rank(s) ran m:f; their stacks:"
    )


@pytest.mark.parametrize("during", ["", " while the ranks started"])
def test_a_hung_call_names_the_late_ranks_and_the_timeout_and_shows_every_stack(during: str) -> None:
    error = RankCallHung(ranks=[1, 2], nranks=3, target="m:f", timeout=2.5, reports=REPORTS, during=during)
    assert str(error) == (
        f"ranks [1, 2] of 3 hung in m:f{during} for 2.5 s; their stacks:"
        "\n----- rank 0 -----\nrank zero's tail"
        "\n----- rank 1 -----\nrank one's tail"
        "\n----- rank 2 -----\nrank two's tail"
    )
    assert (error.ranks, error.timeout, error.reports, error.reason) == ([1, 2], 2.5, REPORTS, "rank hung")
    assert isinstance(error, launcher.RankTimeout) and isinstance(error, TimeoutError)
    assert str(RankCallHung(ranks=[0], nranks=1, target="m:f", timeout=30.0, reports={})) == (
        "ranks [0] of 1 hung in m:f for 30 s; their stacks:"
    )
