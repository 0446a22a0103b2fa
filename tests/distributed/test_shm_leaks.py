"""Nothing leaks from a shared-memory signal group, even when every rank is SIGKILLed in the middle of a run: the
segment's name is removed as soon as every member has mapped it."""

from __future__ import annotations

import signal

import pytest

from fastdeploy_patch.signal_group import SEGMENT_PREFIX, SHM_DIR
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns
from tests.distributed.conftest import leaked_segments, our_segments


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
