"""How the latency and jitter benchmarks time their paths: each path's steps back to back, as a worker loop runs
them, in ``ROUNDS`` rounds that rotate through the paths."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from fastdeploy_patch.status import ModelWeightsStatus

SIGNAL_VALUE = int(ModelWeightsStatus.NORMAL)
"""What every benchmark's src sends each step: the status a worker sees on almost every step."""

ROUNDS = 5
"""Turns each path's timed steps are split into; the turns rotate through the paths, so that slow spells on a noisy
machine spread over every path."""


def measure(
    paths: Mapping[str, Callable[[], object]],
    iters: int,
    warmup: int,
    *,
    rounds: int,
    barrier: Callable[[], object],
    clock: Callable[[], int] | None = None,
) -> dict[str, list[int]]:
    """Time ``iters`` calls of every path after ``warmup`` untimed ones, and return each path's durations in
    nanoseconds, read on ``clock`` (default ``time.perf_counter_ns``).

    Each path runs its calls back to back in ``rounds`` turns that rotate through the paths. ``barrier`` runs
    (untimed) before each path's warm-up and each turn, so that a turn does not start with one rank still finishing
    the previous one. Every rank must pass the same paths in the same order, since each call is a collective.
    """
    clock = clock or time.perf_counter_ns
    samples: dict[str, list[int]] = {name: [] for name in paths}
    for fn in paths.values():
        barrier()
        for _ in range(warmup):
            fn()
    for turn in range(rounds):
        count = iters // rounds + (1 if turn < iters % rounds else 0)
        for name, fn in paths.items():
            timed = samples[name]
            barrier()
            for _ in range(count):
                started = clock()
                fn()
                timed.append(clock() - started)
    return samples
