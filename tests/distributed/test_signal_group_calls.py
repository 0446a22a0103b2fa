"""Calls on real ranks over shared memory, as a serving fleet makes them: a src busy longer than 30 s with every
default (no failure, a warning naming it), a reader's call ended by its timeout or by a signal handler's exception
and then made again (lookahead included), a forked child's call, a second thread's call.

The busy src waits past the default 30 s warning, so its world is started before the session's first test and
collected here (``started_early``): it is the suite's one long wait.
"""

from __future__ import annotations

import pytest

from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns_calls

BUSY_S = 36.0
"""Past the default 30 s warning, and below the 60 s after which it repeats: exactly one warning per reader."""
BUSY_STEPS = 3


@pytest.mark.started_early(
    rank_fns_calls.busy_src, 2, kwargs={"busy_s": BUSY_S, "steps": BUSY_STEPS}, timeout=BUSY_S + 60.0
)
def test_a_src_busy_longer_than_30_s_is_waited_for_with_a_warning_by_default(started_early) -> None:
    src, reader = started_early.result()
    assert src["got"] == reader["got"] == [100, 101, 102]
    assert src["timeout"] is None and reader["timeout"] is None
    assert BUSY_S - 1.0 <= reader["waited"] < BUSY_S + 30.0, reader["waited"]
    [(at, message)] = reader["warnings"]
    # The default threshold, measured from the start of the wait (the src's sleep started a little earlier).
    assert 29.0 <= at < 32.0, at
    assert message.startswith("signal group (ranks [0, 1]): rank 1 has waited 30 s for a broadcast from src 0 ")
    assert message.endswith(
        "(rank 0 has not published the value of call 1); still waiting, as long as the peers are alive"
    )
    assert src["warnings"] == []


@pytest.mark.parametrize("lookahead", [0, 3])
def test_a_call_ended_by_its_timeout_is_finished_by_the_next_call(paddle_ranks: PaddleRanks, lookahead: int) -> None:
    steps = 12
    reports = paddle_ranks.run(
        rank_fns_calls.timeout_then_retry,
        3,
        kwargs={"late_s": 2.5, "timeout": 0.5, "lookahead": lookahead, "steps": steps},
    )
    expected = [-1] * lookahead + [1000 + step for step in range(steps - lookahead)]
    for report in reports:
        assert report["got"] == expected, report
    assert reports[0]["timeouts"] == 0
    for report in reports[1:]:
        # The src was 2.5 s late with call 3: each reader's 0.5 s timeout fired at least twice, at most five times.
        assert 2 <= report["timeouts"] <= 5, report
        assert "the group is still usable: call broadcast_signal() again with src 0" in report["messages"][0]


@pytest.mark.parametrize("lookahead", [0, 2])
def test_a_call_ended_by_a_signal_handlers_exception_is_finished_by_the_next_call(
    paddle_ranks: PaddleRanks, lookahead: int
) -> None:
    steps = 20
    reports = paddle_ranks.run(
        rank_fns_calls.alarm_then_retry,
        3,
        kwargs={"late_s": 0.6, "alarm_s": 0.1, "lookahead": lookahead, "steps": steps},
    )
    expected = [-1] * lookahead + [step * 7 + 1 for step in range(steps - lookahead)]
    for report in reports:
        assert report["got"] == expected, report
    # Four late calls, each 0.6 s late: every reader's 0.1 s alarm ended some of its waits.
    for report in reports[:-1]:
        assert report["alarms"] >= 4, report
    assert reports[-1]["alarms"] == 0


def test_a_forked_childs_call_is_refused_at_once_and_the_parents_go_on(paddle_ranks: PaddleRanks) -> None:
    steps, fork_at = 20, 10
    reports = paddle_ranks.run(rank_fns_calls.forked_child, 2, kwargs={"steps": steps, "fork_at": fork_at})
    expected = [step * 3 for step in range(steps)]
    assert [r["got"] for r in reports] == [expected, expected]
    child = reports[1]["child"]
    assert child["exit"] == 0
    assert child["outcome"].startswith(
        f"SignalGroupError: the signal group (ranks [0, 1]) was created by process {child['parent']}, not by this "
        f"one ({child['pid']}): a forked child must not call broadcast_signal() on its parent's group"
    )
    # At once: the child never waited for a value.
    assert float(child["outcome"].rsplit("(", 1)[1].split(" s)")[0]) < 0.5, child


def test_a_second_thread_calling_during_a_call_is_refused_and_the_call_goes_on(paddle_ranks: PaddleRanks) -> None:
    reports = paddle_ranks.run(rank_fns_calls.second_thread, 3, kwargs={"late_s": 2.0, "steps": 10})
    for report in reports:
        assert report["first"] == [5], report
        assert report["got"] == list(range(10)), report
    assert reports[0]["refused"] is None
    for report in reports[1:]:
        assert report["refused"] == (
            "a broadcast on the signal group (ranks [0, 1, 2]) is already running in this process (another thread, "
            "or a signal handler that interrupted it): calls on one group must not overlap"
        )
