"""fastdeploy_patch.cli.smoke: what one rank does, and how the ranks' results are judged."""

from __future__ import annotations

from unittest import mock

from fastdeploy_patch.cli import smoke


def test_smoke_rank_broadcasts_from_every_src_then_shuts_down_and_restarts():
    group = object()
    calls = []

    def broadcast(value, src, group):
        calls.append((value, src, group))
        return value

    with (
        mock.patch.object(smoke.dist, "get_rank", return_value=1),
        mock.patch.object(smoke.dist, "get_world_size", return_value=3),
        mock.patch.object(smoke, "new_signal_group", return_value=group) as new_group,
        mock.patch.object(smoke, "broadcast_signal", side_effect=broadcast),
        mock.patch.object(smoke, "shutdown_process_groups", return_value=["nccl_pg"]) as shutdown,
        mock.patch.object(smoke.dist, "restart_process_group") as restart,
    ):
        result = smoke.smoke_rank()
    new_group.assert_called_once_with()
    shutdown.assert_called_once_with()
    restart.assert_called_once_with()
    assert calls == [(1000, 0, group), (1001, 1, group), (1002, 2, group), (-7, 0, group)]
    assert result == {
        "rank": 1,
        "received": {"0": 1000, "1": 1001, "2": 1002},
        "shut_down": ["nccl_pg"],
        "after_restart": -7,
    }


def _result(rank, received, after=-7):
    return {"rank": rank, "received": received, "shut_down": [], "after_restart": after}


def test_check_smoke_accepts_ranks_that_saw_every_value():
    good = {"0": 1000, "1": 1001}
    assert smoke.check_smoke([_result(0, good), _result(1, good)]) == []


def test_check_smoke_names_the_rank_and_what_it_saw():
    good = {"0": 1000, "1": 1001}
    stale = {"0": 1000, "1": 1000}
    assert smoke.check_smoke([_result(0, good), _result(1, stale, after=3)]) == [
        f"rank 1 received {stale}, expected {good}",
        "rank 1 received 3 after restart, expected -7",
    ]
