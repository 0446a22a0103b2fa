"""Shared memory on real ranks, across processes: a reader asleep in ``FUTEX_WAIT`` is woken by the late src's
publish, a reader a whole ring behind still gets every value in order, and a reader that dies fails the src
within about a second, long before the src would find the ring full.

Assertions are loose on purpose (the host is shared and noisy): they tell the mechanisms apart, never a tight time.
"""

from __future__ import annotations

import statistics

import pytest

from fastdeploy_patch.signal_group import SHM_RING_SLOTS
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns_wake

LATE_MS = 5.0
LATE_STEPS = 200


def test_a_reader_asleep_in_the_kernel_is_woken_by_the_late_srcs_publish(paddle_ranks: PaddleRanks) -> None:
    src, reader = paddle_ranks.run(rank_fns_wake.late_src_wake, 2, kwargs={"late_ms": LATE_MS, "steps": LATE_STEPS})

    assert reader["received"] == src["received"] == list(range(LATE_STEPS))
    # Across processes: the reader went to sleep in FUTEX_WAIT and the src's wakes reached it.
    assert reader["waits"] >= LATE_STEPS // 2, reader
    assert src["wakes"] >= LATE_STEPS // 2, src
    assert src["waits"] == 0 and reader["wakes"] == 0
    wakes_us = [(back - called) * 1e6 for back, called in zip(reader["stamps"], src["stamps"], strict=True)]
    # Loose: a capped-sleep reader would be up to 1 ms late; here the median must at least beat the pacing, and a
    # busy-waiting reader would use most of a core.
    assert statistics.median(wakes_us) < LATE_MS * 1000, sorted(wakes_us)[len(wakes_us) // 2]
    assert reader["cpu_share"] < 0.5, reader["cpu_share"]


@pytest.mark.parametrize("lookahead", [0, 4])
def test_a_reader_a_whole_ring_behind_the_src_gets_every_value_in_order(
    paddle_ranks: PaddleRanks, lookahead: int
) -> None:
    calls = 400
    src, reader = paddle_ranks.run(
        rank_fns_wake.slow_reader,
        2,
        kwargs={"lookahead": lookahead, "calls": calls, "reader_start_s": 0.5, "reader_pause_s": 0.002},
    )

    expected = [-1] * lookahead + [1000 + call for call in range(calls - lookahead)]
    assert reader["received"] == expected
    assert src["received"] == expected
    # The src really ran a whole ring ahead, and stayed 60 to 64 calls ahead for a while; never more.
    assert max(src["ahead"]) == SHM_RING_SLOTS
    assert sum(60 <= ahead <= SHM_RING_SLOTS for ahead in src["ahead"]) >= 100, src["ahead"]


@pytest.mark.parametrize("lookahead", [0, 4])
def test_a_reader_that_dies_fails_the_src_long_before_the_ring_is_full(
    paddle_ranks: PaddleRanks, lookahead: int
) -> None:
    reader_calls = 10
    src, reader = paddle_ranks.run(
        rank_fns_wake.reader_dies,
        2,
        kwargs={"lookahead": lookahead, "reader_calls": reader_calls, "src_pause_s": 0.02, "max_calls": 300},
    )

    failed = src["failed"]
    assert failed is not None, "the src never noticed its reader was gone"
    assert failed["message"].startswith("signal broadcast from src 0 on the signal group (ranks [0, 1]) failed")
    assert "(rank 1: process " in failed["message"], failed["message"]
    # Found by the src's own look at its readers: far fewer calls than a ring (which the old src needed), at
    # 20 ms a call. (The promise is 1 s; the bound here is loose for the shared host.)
    assert reader_calls <= failed["call"] < reader_calls + SHM_RING_SLOTS // 2, failed
    assert failed["at"] - reader["exited_at"] < 3.0, failed["at"] - reader["exited_at"]
