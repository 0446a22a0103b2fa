"""The paddle_ranks pool reused 50 times in a row: the same rank processes serve every call, each call's
collective and signal group work, and a rank's resident memory stays within a stated bound."""

from __future__ import annotations

import os

import pytest

from fastdeploy_patch import procfs

REUSES = 50
WARMUP_CALLS = 5
RSS_GROWTH_BOUND_BYTES = 32 << 20
"""How much a rank's resident memory may grow over 50 calls after the warm-up. Each call makes an all-reduce and
creates and closes a shared-memory signal group; measured here, growth stayed far below this (see the run's
report)."""


def one_reuse(step: int) -> dict:
    import paddle
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group

    value = paddle.to_tensor([step + dist.get_rank()])
    dist.all_reduce(value)
    with new_signal_group(transport="shm") as group:
        signal = broadcast_signal(step, src=0, group=group)
    return {"pid": os.getpid(), "sum": int(value.item()), "signal": signal, "rss": procfs.rss_bytes("self")}


@pytest.mark.timeout(300)
@pytest.mark.paddle_ranks_reuse("what fifty reuses of one pool cost")
def test_fifty_consecutive_reuses_keep_the_ranks_and_their_memory(paddle_ranks) -> None:
    for step in range(WARMUP_CALLS):
        warm = paddle_ranks.run(one_reuse, 2, kwargs={"step": step})
    pids = [r["pid"] for r in warm]
    start_rss = [r["rss"] for r in warm]
    for step in range(REUSES):
        results = paddle_ranks.run(one_reuse, 2, kwargs={"step": step})
        assert [r["pid"] for r in results] == pids
        assert [r["sum"] for r in results] == [2 * step + 1] * 2
        assert [r["signal"] for r in results] == [step] * 2
    growth = [r["rss"] - before for r, before in zip(results, start_rss, strict=True)]
    print(f"rank RSS after warm-up {start_rss}, growth over {REUSES} reuses {growth} bytes")
    assert max(growth) < RSS_GROWTH_BOUND_BYTES, growth
