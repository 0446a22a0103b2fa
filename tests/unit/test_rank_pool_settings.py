"""The rank pool's settings on fake ranks (real subprocesses that serve calls without joining a world): whole logs of
failed calls kept by worker, test, call and rank; a bound on warm pools; GPU ranks' environment, where the caller's
``env`` wins over every default."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import plugin, pool_world, rank_world
from fastdeploy_patch.testing.rank_pool import RankCallFailed, RankCallHung, RankPools, kept_log_name
from tests.unit.test_rank_pool import FAKE_BOOTSTRAP, rank_id, sleep_long

TEST = "tests/unit/test_x.py::test_y[2-ranks]"


def say_then_raise_on_one(word: str, said: str | None = None) -> int:
    """Each rank prints; rank 1 then raises, once rank 0 has printed when ``said`` names the file rank 0 creates
    after printing (else the pool may be killed before rank 0 got to the call)."""
    rank = os.environ["PADDLE_TRAINER_ID"]
    print(f"rank {rank} says {word}", flush=True)
    if rank == "0" and said is not None:
        Path(said).touch()
    if rank == "1":
        deadline = time.monotonic() + 30
        while said is not None and not Path(said).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ValueError(f"one refuses {word}")
    return int(rank)


def say_then_hang(word: str) -> None:
    print(f"rank {os.environ['PADDLE_TRAINER_ID']} says {word}", flush=True)
    sleep_long()


def world_env() -> dict:
    names = ("PADDLE_DISTRI_BACKEND", "FLAGS_selected_gpus", "CUDA_VISIBLE_DEVICES", "PADDLE_TRAINER_ID", "EXTRA")
    return {name: os.environ.get(name) for name in names}


@pytest.fixture
def kept(tmp_path: Path):
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP, keep_logs=tmp_path / "logs", worker="gw3", current_test=lambda: TEST)
    yield pools, tmp_path / "logs"
    pools.close()


def test_a_kept_logs_name_says_worker_test_call_and_rank() -> None:
    assert kept_log_name("gw0", TEST, 2, 1) == "gw0__tests_unit_test_x.py_test_y_2-ranks__call2__rank1.log"
    assert kept_log_name("main", "x" * 200 + "::t", 1, 0) == f"main__{'x' * 148}_t__call1__rank0.log"


def test_a_failed_call_keeps_every_ranks_whole_log_of_that_call_only(kept) -> None:
    pools, logs = kept
    with pytest.raises(RankCallFailed):
        pools.run(say_then_raise_on_one, 2, kwargs={"word": "fine"}, timeout=30, fresh=True)
    shutil.rmtree(logs)
    assert not logs.exists()
    # A warm pool: its first call (which succeeded) is not in the failed call's logs.
    pools.run(rank_id, 2, timeout=30)
    with pytest.raises(RankCallFailed):
        pools.run(say_then_raise_on_one, 2, kwargs={"word": "late", "said": str(logs.parent / "said")}, timeout=30)
    with pytest.raises(RankCallHung):
        pools.run(say_then_hang, 2, kwargs={"word": "stuck"}, timeout=2)
    names = sorted(path.name for path in logs.iterdir())
    stem = "gw3__tests_unit_test_x.py_test_y_2-ranks"
    assert names == [f"{stem}__call{call}__rank{rank}.log" for call in (3, 4) for rank in (0, 1)]
    raised = {rank: (logs / f"{stem}__call3__rank{rank}.log").read_text() for rank in (0, 1)}
    # Rank 0 may still be saving its coverage when the failed call's SIGTERM comes: what it prints then follows.
    assert raised[0].startswith("rank 0 says late\n") and "says fine" not in raised[0]
    assert raised[1].startswith("rank 1 says late\nTraceback (most recent call last):")
    assert "ValueError: one refuses late" in raised[1] and "says fine" not in raised[1]
    # A fresh pool's log is the call's from the rank's start; a hung rank's log ends with its stack.
    for rank in (0, 1):
        hung = (logs / f"{stem}__call4__rank{rank}.log").read_text()
        assert hung.startswith(f"rank {rank} says stuck\n") and "in sleep_long" in hung


def test_a_log_that_cannot_be_kept_warns_and_the_failure_still_reaches_the_test(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP, keep_logs=blocked / "logs")
    try:
        with pytest.warns(UserWarning, match=r"paddle_ranks could not keep rank 0's log at .*a-file/logs/main__"):
            with pytest.raises(RankCallFailed, match="one refuses"):
                pools.run(say_then_raise_on_one, 2, kwargs={"word": "x"}, timeout=30)
    finally:
        pools.close()


def test_max_pools_bounds_the_warm_pools() -> None:
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP, max_pools=1)
    try:
        pools.run(rank_id, 1, timeout=30)
        pools.run(rank_id, 2, timeout=30)
        assert len(pools.live_pids()) == 2
        assert pools.recycles == {"another world size or environment": 1}
    finally:
        pools.close()


def test_gpu_ranks_get_gpu_r_and_nccl_and_the_callers_env_wins_over_every_default() -> None:
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP)
    try:
        gpu = pools.run(world_env, 2, timeout=30, devices="gpu")
        assert gpu == [
            {
                "PADDLE_DISTRI_BACKEND": "nccl",
                "FLAGS_selected_gpus": str(rank),
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "PADDLE_TRAINER_ID": str(rank),
                "EXTRA": None,
            }
            for rank in (0, 1)
        ]
        cpu = pools.run(world_env, 2, timeout=30)
        assert [(r["PADDLE_DISTRI_BACKEND"], r["FLAGS_selected_gpus"], r["CUDA_VISIBLE_DEVICES"]) for r in cpu] == [
            ("gloo", os.environ.get("FLAGS_selected_gpus"), "")
        ] * 2
        # Another devices setting is another pool.
        assert pools.starts == 2
        mine = {
            "CUDA_VISIBLE_DEVICES": "5,6",
            "FLAGS_selected_gpus": "1",
            "PADDLE_DISTRI_BACKEND": "nccl",
            "EXTRA": "e",
        }
        own = pools.run(world_env, 1, timeout=30, devices="gpu", env=mine)
        assert own == [{**mine, "PADDLE_TRAINER_ID": "0"}]
    finally:
        pools.close()


def test_devices_must_be_cpu_or_gpu_before_anything_starts() -> None:
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP)
    for call in (pools.run, pools.start):
        with pytest.raises(ValueError, match=r"^devices must be 'cpu' or 'gpu', got 'tpu'$"):
            call(rank_id, 1, timeout=30, devices="tpu")
    assert pools.starts == 0


def test_the_handle_passes_devices_and_its_session_timeout_on() -> None:
    seen: list[dict] = []

    class Pools:
        def run(self, fn, nranks, **options):
            seen.append(options)
            return []

        def start(self, fn, nranks, **options):
            seen.append(options)

    handle = plugin.PaddleRanks(Pools(), {"A": "1"}, timeout=3.0)
    handle.run(rank_id, 2, devices="gpu")
    handle.start(rank_id, 2, devices="gpu", timeout=5)
    with pytest.raises(pytest.fail.Exception):
        handle.run_expecting_failure(rank_id, 2, devices="gpu")
    assert [(o["devices"], o["timeout"]) for o in seen] == [("gpu", 3.0), ("gpu", 5), ("gpu", 3.0)]
    assert seen[0]["env"]["A"] == "1" and seen[0]["env"]["PADDLE_RANKS_RUN"]


def test_new_pools_follow_the_settings_and_name_the_xdist_worker(tmp_path: Path) -> None:
    settings = SimpleSettings(max_pools=1, keep_logs=tmp_path)
    pools = plugin.new_pools(type("Config", (), {"workerinput": {"workerid": "gw7"}})(), settings, lambda: "t")
    assert (pools.max_pools, pools.keep_logs, pools.worker, pools.current_test()) == (1, tmp_path, "gw7", "t")
    assert plugin.new_pools(object(), settings, lambda: "t").worker == "main"


class SimpleSettings:
    def __init__(self, max_pools: int, keep_logs: Path) -> None:
        self.max_pools, self.keep_logs = max_pools, keep_logs


def test_a_rank_whose_start_fails_leaves_its_pipe_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[int] = []

    def refuse(spec):
        closed.append(spec.pass_fds[0])
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(pool_world, "start_rank", refuse)
    pool = pool_world.RankPool(1, {}, bootstrap=FAKE_BOOTSTRAP)
    before = procfs.fds("self")
    with pytest.raises(OSError, match="Too many open files"):
        pool.launch()
    pool.kill()
    assert procfs.fds("self") == before and pool.pids() == []


def test_check_devices_returns_what_it_accepts() -> None:
    assert [rank_world.check_devices(devices) for devices in ("cpu", "gpu")] == ["cpu", "gpu"]
