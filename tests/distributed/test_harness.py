"""The harness turns a failing or hanging rank into a readable pytest failure that names the rank."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.distributed import rank_fns
from tests.distributed.harness import run_ranks_or_fail

HANG_TIMEOUT_S = 10


def test_a_failing_rank_is_named_with_its_traceback_and_the_others_are_killed() -> None:
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_ranks_or_fail(rank_fns.fail_on, 2, kwargs={"rank": 1, "message": "rank 1 gave up on purpose"})

    text = str(failure.value)
    assert text.startswith(
        "rank 1 of 2 failed in tests.distributed.rank_fns:fail_on: it exited before replying, exit code 1\n"
        "----- rank 1 -----\n"
    )
    assert "Traceback (most recent call last):" in text
    assert "ValueError: rank 1 gave up on purpose" in text
    assert "----- rank 0 (log tail) -----" in text
    # Rank 0 sleeps for 600 s: only killing it ends the launch this early.
    assert time.monotonic() - started < 120


def test_a_hanging_rank_is_named_with_its_stack_and_killed(tmp_path: Path) -> None:
    entered = tmp_path / "rank1-in-the-hang"
    with pytest.raises(pytest.fail.Exception) as failure:
        # The launcher counts the timeout from the moment both ranks joined the world and imported their target, so
        # however long their start took on a busy host, rank 1 is in the hang and rank 0 has returned when it fires.
        run_ranks_or_fail(rank_fns.hang_on, 2, kwargs={"rank": 1, "entered": str(entered)}, timeout=HANG_TIMEOUT_S)

    text = str(failure.value)
    assert text.startswith(
        f"ranks [1] of 2 hung in tests.distributed.rank_fns:hang_on for {HANG_TIMEOUT_S} s; their stacks:"
    )
    assert "----- rank 1 -----" in text and "----- rank 0 -----" not in text
    assert "_hanging_here" in text
    # The rank said it was in the hang: the stack shown is the hang's, not one of a rank still starting.
    assert entered.exists()
