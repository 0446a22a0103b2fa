"""A rank that crashes in native code (a segfault, an abort) is reported with the signal and its Python stack,
whoever started it: the launcher (the CLI's ranks) or the rank pool. faulthandler, armed for fatal signals in
every rank and re-armed after ``import paddle`` replaced it, writes the stack into the rank's log."""

from __future__ import annotations

import re
import signal

import pytest

from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns
from tests.distributed.harness import run_ranks_or_fail

FATAL_ERRORS = {"segv": "Fatal Python error: Segmentation fault", "abort": "Fatal Python error: Aborted"}
SIGNALS = {"segv": signal.SIGSEGV, "abort": signal.SIGABRT}


def _assert_stack_names_the_crashing_function(log: str, how: str) -> None:
    assert FATAL_ERRORS[how] in log, log
    # faulthandler's dump of the crashing thread: innermost frame first, the rank function below it.
    assert re.search(
        r'File ".*rank_fns\.py", line \d+ in _crashing_here\n\s+File ".*rank_fns\.py", line \d+ in crash_on', log
    ), log


def test_a_launched_rank_that_segfaults_is_named_with_the_signal_and_its_stack() -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        run_ranks_or_fail(rank_fns.crash_on, 2, kwargs={"rank": 1, "how": "segv"})

    text = str(failure.value)
    # The launcher's report reads as the pool's (below): one format.
    assert text.startswith(
        "rank 1 of 2 failed in tests.distributed.rank_fns:crash_on: it exited before replying, exit code -11 "
        "(SIGSEGV)\n----- rank 1 -----\n"
    )
    crashed = text.split("----- rank 1 -----\n", 1)[1].split("----- rank 0 (log tail) -----", 1)[0]
    _assert_stack_names_the_crashing_function(crashed, "segv")


@pytest.mark.parametrize("how", ["segv", "abort"])
def test_a_pool_rank_that_crashes_is_named_with_the_signal_and_its_stack(paddle_ranks: PaddleRanks, how: str) -> None:
    failed = paddle_ranks.run_expecting_failure(rank_fns.crash_on, 2, kwargs={"rank": 0, "how": how})

    assert (failed.rank, failed.returncode) == (0, -SIGNALS[how])
    assert str(failed).startswith(
        f"rank 0 of 2 failed in tests.distributed.rank_fns:crash_on: it exited before replying, "
        f"exit code {-SIGNALS[how]} ({SIGNALS[how].name})\n----- rank 0 -----\n"
    )
    _assert_stack_names_the_crashing_function(failed.reports[0], how)
    assert "in _crashing_here" not in failed.reports[1]
