"""Fresh worlds forked from a warm parent, as a test of this suite gets them by default: every rank is a fork of one
parent per test process, which forks only with one thread and holds no store; a world whose environment sets what
Paddle or Python read at start is spawned instead."""

from __future__ import annotations

import os

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import leak_guard, pool_world, warm_parent
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns_fresh


def _why_spawned(paddle_ranks: PaddleRanks) -> str | None:
    """Why this test process's next default world would be spawned (None: it is forked), as the pool decides."""
    env = paddle_ranks._options(None, None, "cpu")["env"]
    return pool_world.RankPool(2, env)._spawn_reason({**os.environ, **warm_parent.PARENT_ENV, **env})


def _sockets(pid: int) -> list[int]:
    return [fd for fd in procfs.fds(pid) or [] if os.readlink(procfs.fd_path(pid, fd)).startswith("socket:")]


def test_every_fresh_world_is_forked_from_one_parent_with_one_thread_and_no_store(paddle_ranks: PaddleRanks) -> None:
    first = paddle_ranks.run(rank_fns_fresh.origin, 2)
    second = paddle_ranks.run(rank_fns_fresh.origin, 3)
    parent = warm_parent.shared_pid()
    assert parent is not None and parent != os.getpid()
    assert {r["ppid"] for r in first + second} == {parent}, (
        _why_spawned(paddle_ranks),
        {pid: (procfs.stat(pid), procfs.cmdline(pid)) for pid in {r["ppid"] for r in first + second} | {parent}},
    )
    assert not {r["pid"] for r in first} & {r["pid"] for r in second}
    # Every fork this process's parent made, in this test and the ones before it on this worker.
    forks = warm_parent.shared({}).threads_at_fork
    assert len(forks) >= 5 and set(forks) == {1}
    # Between forks the parent holds its socket to this process and nothing else: no store, no rank's connection.
    assert len(_sockets(parent)) == 1 and procfs.threads(parent) == 1


def test_a_world_whose_env_sets_what_paddle_reads_at_start_is_spawned(paddle_ranks: PaddleRanks) -> None:
    spawned = paddle_ranks.run(rank_fns_fresh.origin, 2, env={"OMP_NUM_THREADS": "3"})
    assert {r["ppid"] for r in spawned} == {os.getpid()}
    assert [r["omp"] for r in spawned] == ["3", "3"]
    forked = paddle_ranks.run(rank_fns_fresh.origin, 2)
    # BLAS in a forked rank runs on the one thread its parent started with, and its environment says so.
    assert {r["ppid"] for r in forked} == {warm_parent.shared_pid()} and [r["omp"] for r in forked] == ["1", "1"]


def test_a_world_that_sets_what_paddle_reads_at_start_never_becomes_the_parent_of_the_next(
    paddle_ranks: PaddleRanks,
) -> None:
    # Whether or not this process has a warm parent yet (the order of tests decides), the next world is forked.
    spawned = paddle_ranks.run(rank_fns_fresh.origin, 2, env={"OMP_NUM_THREADS": "3"})
    assert {r["ppid"] for r in spawned} == {os.getpid()}
    forked = paddle_ranks.run(rank_fns_fresh.origin, 2)
    assert {r["ppid"] for r in forked} == {warm_parent.shared_pid()} != {os.getpid()}


def test_forked_ranks_carry_the_tag_the_leak_guard_finds_them_by(paddle_ranks: PaddleRanks) -> None:
    started = paddle_ranks.start(rank_fns_fresh.wait, 2)
    try:
        assert _why_spawned(paddle_ranks) is None
        # A forked rank's /proc environ is its parent's start-time environment, which holds the run's tag.
        assert set(started._started.pids()) <= set(leak_guard.tagged_processes())
    finally:
        started.cancel()
