"""Nothing leaks from a shared-memory signal group: every rank SIGKILLed in the middle of a run (the name is removed
as soon as every member has mapped the segment), the creator SIGKILLed inside the handshake, before that (its
resource tracker removes the name), and a creator whose handshake fails (it removes the name itself).

These tests look in /dev/shm only for the names their own groups made."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fastdeploy_patch.signal_group import SEGMENT_PREFIX, SHM_DIR
from fastdeploy_patch.signal_group.liveness import gone_reason
from fastdeploy_patch.signal_group.shm_diagnostics import segment_creator
from fastdeploy_patch.testing.leak_guard import leaked_segments, our_segments
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns, rank_fns_leaks

RANKS_START_S = 240.0
"""Hang guard for a fresh world's start (import Paddle, join) on a loaded 2-core host."""

TRACKER_S = 10.0
"""Hang guard for the dead creator's resource tracker: it removes the name within milliseconds of the kill."""


@pytest.mark.parametrize("nranks", [2, 4])
def test_every_rank_killed_mid_run_leaves_nothing_in_dev_shm(paddle_ranks: PaddleRanks, nranks: int) -> None:
    before = our_segments()
    failed = paddle_ranks.run_expecting_failure(rank_fns.killed_mid_run, nranks, kwargs={"steps": 300})

    assert failed.returncode == -signal.SIGKILL
    # Each rank that got to print its maps had the segment mapped, already unlinked: the kernel frees it with the
    # last mapping.
    maps = [tail for tail in failed.reports.values() if "maps: [" in tail]
    assert maps, failed.reports
    for tail in maps:
        assert f"{SHM_DIR}/{SEGMENT_PREFIX}" in tail and "(deleted)" in tail, tail
    assert leaked_segments(before) == set()


def _poll(condition, within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.timeout(RANKS_START_S + 60)
def test_a_creator_sigkilled_inside_the_handshake_leaves_no_segment(paddle_ranks: PaddleRanks, tmp_path: Path) -> None:
    name_file = tmp_path / "segment"
    started = paddle_ranks.start(
        rank_fns_leaks.stalled_in_the_handshake,
        2,
        kwargs={"name_file": str(name_file), "stall_s": 60.0},
        timeout=RANKS_START_S + 60,
    )
    try:
        assert _poll(name_file.exists, RANKS_START_S), "rank 1 never reached the handshake"
        path = Path(SHM_DIR) / name_file.read_text()
        # Before: the segment is there, its creator alive and waiting for rank 1's answer.
        creator = segment_creator(str(path))
        assert creator is not None and gone_reason(creator) is None
        # Its pid alone, as the OOM killer does: a kill of the process group would take the tracker along.
        os.kill(creator.pid, signal.SIGKILL)
        gone = _poll(lambda: not path.exists(), TRACKER_S)
    finally:
        started.cancel()
    if not gone:
        path.unlink(missing_ok=True)
    assert gone, f"{path} outlived its SIGKILLed creator by {TRACKER_S} s"


@pytest.mark.parametrize("failure", sorted(rank_fns_leaks.FAILURES))
def test_a_creator_whose_handshake_fails_removes_its_segment_at_once(paddle_ranks: PaddleRanks, failure: str) -> None:
    creator, attacher = paddle_ranks.run(
        rank_fns_leaks.creator_fails_reading_the_answers, 2, kwargs={"failure": failure}
    )

    if failure == "timeout":
        # A store error: the store's host is taken to be gone.
        assert creator["raised"].startswith(
            "SignalGroupError: creating signal group #1 (ranks [0, 1]) on rank 0 failed"
        )
        assert "failed (the store's get timed out (a stand-in for Paddle's store timeout))" in creator["raised"]
    else:
        assert creator["raised"] == "KeyboardInterrupt: "
    assert creator["name"].startswith(SEGMENT_PREFIX)
    # Gone while its creator was still alive: removed by the handshake's own way out, not by the tracker.
    assert creator["left"] is False
    assert not (Path(SHM_DIR) / creator["name"]).exists()
    # Rank 1 got the group (and closed it), or learned of rank 0's failure first.
    assert attacher["rank"] == 1
    if attacher["raised"] is not None:
        assert attacher["raised"].startswith("PeerFailed: creating signal group #1 (ranks [0, 1]) on rank 1 failed")
        assert "rank 0 could not create it" in attacher["raised"]
