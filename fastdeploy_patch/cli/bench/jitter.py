"""The jitter benchmark (``fastdeploy-patch bench --jitter``): every rank runs a loop whose steps each do their own
CPU work, drawn per rank and step, and the loop time per step is compared with no sync, with lockstep syncs (gloo,
shm) and with shm and a lookahead, which lets a rank run a few steps ahead instead of paying the slowest rank's
jitter every step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from fastdeploy_patch.cli.bench.timing import ROUNDS, SIGNAL_VALUE, measure

LOOKAHEAD = 4
"""The lookahead of the pipelined path: a status takes effect 4 steps after it is published."""

WORK_US = (200, 400)
"""The CPU work of each step, drawn uniformly from this range (inclusive) per rank and step: the scale of a
small-batch decode step's host-side work."""

SEED = 0
"""Seeds each rank's draws (with its rank), so that every path and every run sees the same work."""

LABELS = {
    "nosync": "no sync",
    "gloo": "gloo, lockstep",
    "shm": "shm, lockstep",
    "shm_lookahead": f"shm, lookahead {LOOKAHEAD}",
}
"""What each path is, in report order."""


def busy_wait_us(microseconds: int, clock: Callable[[], int] | None = None) -> None:
    """Keep the CPU busy for ``microseconds`` on ``clock`` (default ``time.perf_counter_ns``): a stand-in for a
    step's host-side work."""
    clock = clock or time.perf_counter_ns
    end = clock() + microseconds * 1000
    while clock() < end:
        pass


def work_draws(rank: int, count: int, seed: int = SEED) -> list[int]:
    """``count`` step costs in microseconds for ``rank``, uniform over ``WORK_US``; the same for the same rank and
    seed, different between ranks."""
    low, high = WORK_US
    return [int(us) for us in np.random.default_rng([seed, rank]).integers(low, high + 1, size=count)]


def jitter_step(draws: Sequence[int], sync: Callable[[], object], work: Callable[[int], None]) -> Callable[[], None]:
    """One loop step per call: the next draw's ``work``, then ``sync``; the draws repeat when used up."""
    costs: Iterator[int] = _cycle(draws)

    def step() -> None:
        work(next(costs))
        sync()

    return step


def _no_sync() -> None:
    """The loop's step with nothing to sync: the baseline every other path is compared with."""


def _cycle(values: Sequence[int]) -> Iterator[int]:
    while True:
        yield from values


def jitter_rank(iters: int, warmup: int) -> dict:
    """On one rank: time ``iters`` loop steps (after ``warmup``) of per-step CPU work with each sync path; returns
    ``{"rank", "samples_ns", "work_us_mean"}`` with each path's step durations in nanoseconds."""
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group

    rank = dist.get_rank()
    gloo = new_signal_group(transport="gloo")
    shm = new_signal_group(transport="shm")
    pipelined = new_signal_group(transport="shm", lookahead=LOOKAHEAD)
    # Every path works through the same draws, so that they differ only in how they sync.
    draws = work_draws(rank, iters + warmup)
    syncs: dict[str, Callable[[], object]] = {
        "nosync": _no_sync,
        "gloo": lambda: broadcast_signal(SIGNAL_VALUE, src=0, group=gloo),
        "shm": lambda: broadcast_signal(SIGNAL_VALUE, src=0, group=shm),
        "shm_lookahead": lambda: broadcast_signal(SIGNAL_VALUE, src=0, group=pipelined),
    }
    paths = {name: jitter_step(draws, sync, busy_wait_us) for name, sync in syncs.items()}
    try:
        samples = measure(paths, iters, warmup, rounds=ROUNDS, barrier=dist.barrier)
    finally:
        for group in (gloo, shm, pipelined):
            group.close()
    return {"rank": rank, "samples_ns": samples, "work_us_mean": float(np.mean(draws))}
