"""Faults on real ranks: a peer that dies and a peer that is stuck end in a clear error, never a hang.

The faulty rank leaves through ``rank_fns.exit_now`` with exit code 0, so the launcher does not kill the
survivors before they report what they saw.
"""

from __future__ import annotations

import pytest

from tests.distributed import rank_fns
from tests.distributed.harness import run_ranks_or_fail

SIGNAL_TIMEOUT_S = 2.0
# Generous: the promise is "timeout plus about a second"; the machine is shared and noisy.
TIMEOUT_SLACK_S = 5.0
DEAD_SIGNAL_TIMEOUT_S = 10.0


@pytest.mark.parametrize(("nranks", "victim"), [(2, 1), (4, 0)], ids=["2ranks-receiver-dies", "4ranks-src-dies"])
def test_a_rank_that_dies_mid_loop_makes_every_survivor_fail_clearly(nranks: int, victim: int) -> None:
    die_at = 25
    reports = run_ranks_or_fail(
        rank_fns.dead_peer,
        nranks,
        kwargs={"victim": victim, "die_at": die_at, "steps": 2000, "timeout": DEAD_SIGNAL_TIMEOUT_S},
    )

    assert reports[victim] == {"rank": victim, "died_at": die_at}
    survivors = [r for r in reports if r["rank"] != victim]
    assert [r["rank"] for r in survivors] == [rank for rank in range(nranks) if rank != victim]
    for report in survivors:
        rank = report["rank"]
        assert report["type"] == "SignalGroupError", f"rank {rank}: {report}"
        assert "a peer exited or dropped its connection" in report["message"], f"rank {rank}"
        assert f"on the signal group (ranks {list(range(nranks))})" in report["message"]
        assert report["step"] >= die_at
        # Well before the group's timeout: a dead peer is noticed, not waited out.
        assert report["elapsed"] < DEAD_SIGNAL_TIMEOUT_S, f"rank {rank}"
        assert report["again"]["type"] == "SignalGroupError"
        assert report["again"]["message"].startswith(f"the signal group (ranks {list(range(nranks))}) is unusable")


@pytest.mark.parametrize(("nranks", "stuck"), [(2, 0), (4, 3)], ids=["2ranks-rank0-stuck", "4ranks-rank3-stuck"])
def test_a_rank_that_stops_participating_makes_the_others_time_out(nranks: int, stuck: int) -> None:
    stuck_for = SIGNAL_TIMEOUT_S + TIMEOUT_SLACK_S + 1.0
    reports = run_ranks_or_fail(
        rank_fns.stuck_peer,
        nranks,
        kwargs={"stuck": stuck, "stuck_at": 10, "timeout": SIGNAL_TIMEOUT_S, "stuck_for": stuck_for},
    )

    assert reports[stuck] == {"rank": stuck, "slept": stuck_for}
    for report in reports:
        if report["rank"] == stuck:
            continue
        rank = report["rank"]
        assert report["error"]["type"] == "TimeoutError", f"rank {rank}: {report}"
        assert report["error"]["message"].startswith(
            f"signal broadcast from src {stuck} on the signal group (ranks {list(range(nranks))}) got no answer"
        )
        assert f"(timeout {SIGNAL_TIMEOUT_S:g} s): a peer is stuck" in report["error"]["message"]
        assert SIGNAL_TIMEOUT_S <= report["elapsed"] < SIGNAL_TIMEOUT_S + TIMEOUT_SLACK_S, f"rank {rank}"
        # The group is marked unusable: the next call fails at once instead of waiting again.
        assert report["again"]["type"] == "SignalGroupError"
        assert "is unusable: a broadcast from src" in report["again"]["message"]
        assert report["again_elapsed"] < SIGNAL_TIMEOUT_S
