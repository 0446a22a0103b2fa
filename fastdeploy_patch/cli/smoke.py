"""The quick end-to-end check behind ``fastdeploy-patch smoke``."""

from __future__ import annotations

import paddle.distributed as dist

from fastdeploy_patch.group_shutdown import shutdown_process_groups
from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group


def smoke_rank() -> dict:
    """On one rank: create the signal group, broadcast from every src, shut down safely, restart, broadcast
    again. Returns what this rank saw."""
    rank, nranks = dist.get_rank(), dist.get_world_size()
    group = new_signal_group()
    received = {src: broadcast_signal(1000 + src, src=src, group=group) for src in range(nranks)}
    shut_down = shutdown_process_groups()
    dist.restart_process_group()
    after_restart = broadcast_signal(-7, src=0, group=group)
    return {
        "rank": rank,
        "received": {str(src): value for src, value in received.items()},
        "shut_down": shut_down,
        "after_restart": after_restart,
    }


def check_smoke(results: list[dict]) -> list[str]:
    """Return the problems in the ranks' smoke results (empty when every rank saw every value)."""
    nranks = len(results)
    expected = {str(src): 1000 + src for src in range(nranks)}
    problems = []
    for result in results:
        if result["received"] != expected:
            problems.append(f"rank {result['rank']} received {result['received']}, expected {expected}")
        if result["after_restart"] != -7:
            problems.append(f"rank {result['rank']} received {result['after_restart']} after restart, expected -7")
    return problems
