"""Faults on real ranks, on both transports and with lookahead: a peer that dies and a peer that is stuck end in
a clear error within bounds, never a hang.

Every case runs on a fresh world: its ranks leave through ``exit_after_reply`` (the dead peer first, the others
once they reported what they saw). The case with a 31 s timeout mostly waits, so its world is started before the
session's first test and collected here (``started_early``).
"""

from __future__ import annotations

import pytest

from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns

SIGNAL_TIMEOUT_S = 2.0
# Above gloo's fixed 30 s: only shared memory can honour it.
LONG_SIGNAL_TIMEOUT_S = 31.0
TIMEOUT_SLACK_S = 5.0
"""A hang guard on how far past its timeout a waiting call may give up: the promise is "timeout plus about a
second", the worst overshoot seen beside a CPU hog was 8 ms, and a call that missed its own deadline would wait gloo's
fixed 30 s or forever."""
DEAD_SIGNAL_TIMEOUT_S = 10.0
STUCK_RELEASE_S = 45.0
"""How long the stuck rank stays stuck at most, should the others never leave: a hang guard only. The others'
leaving releases it (their timeout, their last call and their exit, under coverage on a busy host)."""

DEAD_CASES = [
    (2, 1, "gloo", 0),
    (4, 0, "gloo", 0),
    (2, 1, "shm", 0),
    (4, 0, "shm", 3),
    (4, 2, "shm", 0),
]


@pytest.mark.parametrize(
    ("nranks", "victim", "transport", "lookahead"),
    DEAD_CASES,
    ids=[f"{n}ranks-{'src' if v == 0 else 'receiver'}-dies-{t}-lookahead{d}" for n, v, t, d in DEAD_CASES],
)
def test_a_rank_that_dies_mid_loop_makes_every_survivor_fail_clearly(
    paddle_ranks: PaddleRanks, nranks: int, victim: int, transport: str, lookahead: int
) -> None:
    die_at = 25
    reports = paddle_ranks.run(
        rank_fns.dead_peer,
        nranks,
        kwargs={
            "victim": victim,
            "die_at": die_at,
            "steps": 2000,
            "timeout": DEAD_SIGNAL_TIMEOUT_S,
            "transport": transport,
            "lookahead": lookahead,
        },
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
        # Before the group's timeout: a dead peer is noticed, not waited out. (How soon shared memory notices, every
        # LIVENESS_INTERVAL_S of waiting, is the unit tests' to pin on a fake clock: a busy host only delays it.)
        assert report["elapsed"] < DEAD_SIGNAL_TIMEOUT_S, report
        if transport == "shm":
            # Named: by the survivor that found it gone, or through the mark it left in the segment.
            assert f"rank {victim}" in report["message"], report
        assert report["again"]["type"] == "SignalGroupError"
        assert report["again"]["message"].startswith(f"the signal group (ranks {list(range(nranks))}) is unusable")


STUCK_CASES = [
    (2, 0, "gloo", 0, SIGNAL_TIMEOUT_S),
    (4, 3, "gloo", 0, SIGNAL_TIMEOUT_S),
    (2, 0, "shm", 0, SIGNAL_TIMEOUT_S),
    (4, 3, "shm", 4, SIGNAL_TIMEOUT_S),
]
LONG_STUCK_CASE = (2, 1, "shm", 0, LONG_SIGNAL_TIMEOUT_S)
STUCK_AT = 10


def stuck_kwargs(stuck: int, transport: str, lookahead: int, timeout: float) -> dict:
    """The arguments of ``rank_fns.stuck_peer``: the stuck rank is kept stuck until the others have all reported and
    left (``STUCK_RELEASE_S`` past their timeout at most)."""
    return {
        "stuck": stuck,
        "stuck_at": STUCK_AT,
        "timeout": timeout,
        "stuck_for": timeout + STUCK_RELEASE_S,
        "transport": transport,
        "lookahead": lookahead,
    }


def stuck_call_timeout(timeout: float) -> float:
    """A hang guard on the whole call, counted once its ranks are ready: above the stuck rank's own bound."""
    return timeout + STUCK_RELEASE_S + 15.0


@pytest.mark.parametrize(
    ("nranks", "stuck", "transport", "lookahead", "timeout"),
    STUCK_CASES,
    ids=[f"{n}ranks-rank{s}-stuck-{t}-lookahead{d}-timeout{w:g}s" for n, s, t, d, w in STUCK_CASES],
)
def test_a_rank_that_stops_participating_makes_the_others_time_out(
    paddle_ranks: PaddleRanks, nranks: int, stuck: int, transport: str, lookahead: int, timeout: float
) -> None:
    reports = paddle_ranks.run(
        rank_fns.stuck_peer,
        nranks,
        kwargs=stuck_kwargs(stuck, transport, lookahead, timeout),
        timeout=stuck_call_timeout(timeout),
    )
    _assert_the_others_timed_out(reports, nranks, stuck, lookahead, timeout)


_LONG_N, _LONG_STUCK, _LONG_TRANSPORT, _LONG_LOOKAHEAD, _LONG_TIMEOUT = LONG_STUCK_CASE


@pytest.mark.started_early(
    rank_fns.stuck_peer,
    _LONG_N,
    kwargs=stuck_kwargs(_LONG_STUCK, _LONG_TRANSPORT, _LONG_LOOKAHEAD, _LONG_TIMEOUT),
    # Counted from the moment its ranks joined the world, before the tests that run meanwhile: a call that ended by
    # the time this test collects it is collected at once.
    timeout=stuck_call_timeout(_LONG_TIMEOUT),
)
def test_a_stuck_rank_on_shared_memory_is_waited_for_as_long_as_a_timeout_above_gloos_fixed_limit(
    started_early,
) -> None:
    assert started_early.kwargs == stuck_kwargs(_LONG_STUCK, _LONG_TRANSPORT, _LONG_LOOKAHEAD, _LONG_TIMEOUT)
    _assert_the_others_timed_out(started_early.result(), _LONG_N, _LONG_STUCK, _LONG_LOOKAHEAD, _LONG_TIMEOUT)


def _assert_the_others_timed_out(reports: list[dict], nranks: int, stuck: int, lookahead: int, timeout: float) -> None:
    stuck_report = reports[stuck]
    assert stuck_report["rank"] == stuck
    # Still stuck when every other rank had given up and left: released by their leaving, not by its own bound.
    assert stuck_report["peers_left"] is True, stuck_report
    assert stuck_report["slept"] >= timeout, stuck_report
    for report in reports:
        if report["rank"] == stuck:
            continue
        rank = report["rank"]
        assert report["error"]["type"] == "TimeoutError", f"rank {rank}: {report}"
        assert report["error"]["message"].startswith(
            f"signal broadcast from src {stuck} on the signal group (ranks {list(range(nranks))}) got no answer"
        )
        assert f"(timeout {timeout:g} s): a peer is slow or stuck" in report["error"]["message"]
        assert timeout <= report["elapsed"] < timeout + TIMEOUT_SLACK_S, f"rank {rank}"
        # The calls whose values were published before the src stopped still returned them, in order.
        assert report["returned_after_stuck"] == list(range(STUCK_AT - lookahead, STUCK_AT)), f"rank {rank}"
        # The group stays usable: the next call must finish the one that timed out, so another src is refused at
        # once, before any communication.
        assert report["again"] == {
            "type": "ValueError",
            "message": f"src {(stuck + 1) % nranks} is not the src of the call that ended early on this rank (src "
            f"{stuck}): call broadcast_signal() with src {stuck} to finish it; every member makes the same calls",
        }, f"rank {rank}"
        assert report["again_elapsed"] < timeout, f"rank {rank}"
