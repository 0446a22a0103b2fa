"""The late-src benchmark (``fastdeploy-patch bench --src-late MS``, 2 ranks): how fast a waiting reader wakes.

The src sleeps MS milliseconds before each timed publish while the reader already waits, on a shared-memory and on
a gloo signal group, and, as the floor under both, on one bare futex word (``FutexFloor``). Each step already
sleeps, so the paths take turns step by step (shm, gloo, floor, shm, ...): a host that wakes an idle CPU slower for
a minute slows every path alike, and the shm wake over the floor's compares wakes from the same minutes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable
from typing import Any

from fastdeploy_patch import procfs
from fastdeploy_patch.cli.bench.timing import SIGNAL_VALUE

LABELS = {
    "shm": "shm: broadcast_signal, shared memory",
    "gloo": "gloo: broadcast_signal (paddle.distributed.broadcast)",
    "futex_floor": "floor: bare futex wake on one shared word",
}
"""What the benchmark runs, in report order: the transports, then the floor (where futex works)."""

FLOOR_TIMEOUT_S = 60.0
"""How long the floor's reader waits for one step before it gives up: far beyond any ``--src-late``. It sleeps all of
it in one ``FUTEX_WAIT``. With shorter sleeps of its own (1 s before), a gap near their length let the reader's
timeout end just before the publish (in 1 step of 5 at ``--src-late 1000``, measured here), so the floor timed a
reader that had just run instead of a wake from idle."""


class FutexFloor:
    """The bare futex wake between 2 ranks, the floor under the shm transport's: one 32-bit word in a page both
    ranks map; the src stores the step's number there and calls ``FUTEX_WAKE``, the reader sleeps in ``FUTEX_WAIT``
    on it at once. It uses the transport's own futex calls (``futex``) and nothing else of it."""

    def __init__(self, futex: Any, page: mmap.mmap, *, src: bool) -> None:
        self._futex = futex
        self._page = page
        self._word = ctypes.c_uint32.from_buffer(page)
        self._address = ctypes.addressof(self._word)
        # The transport's own way to wake: its arguments made once.
        self._wake = futex.waker(self._address)
        self._src = src
        self._step = 0

    def call(self) -> None:
        """On the src: publish the next step and wake the reader. On the reader: return once the next step (or a
        later one) is published; ``TimeoutError`` after ``FLOOR_TIMEOUT_S``."""
        self._step += 1
        step = self._step
        if self._src:
            self._word.value = step
            self._wake()
            return
        deadline = time.monotonic() + FLOOR_TIMEOUT_S
        while (seen := self._word.value) < step:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the floor's src did not publish step {step} within {FLOOR_TIMEOUT_S:g} s")
            self._futex.wait(self._address, seen, left)

    def close(self) -> None:
        """Unmap the page."""
        del self._word
        self._page.close()


def _descriptor_path(fd: int) -> str:
    """Where another process of this host opens this process's descriptor ``fd``."""
    return procfs.fd_path(os.getpid(), fd)


def shared_page(rank: int) -> mmap.mmap:
    """Collective over the world: one page of memory that every rank maps. It has no name anywhere (a memfd of
    rank 0, which the others open through ``/proc``), so no rank's death can leave it behind."""
    import paddle.distributed as dist

    box: list[str | None] = [None]
    if rank == 0:
        fd = os.memfd_create("fdp-bench-floor")
        os.ftruncate(fd, mmap.PAGESIZE)
        box[0] = _descriptor_path(fd)
    dist.broadcast_object_list(box, src=0)
    if rank != 0:
        fd = os.open(box[0], os.O_RDWR)
    try:
        return mmap.mmap(fd, mmap.PAGESIZE)
    finally:
        # Rank 0's descriptor is the others' way in: it stays open until every rank has its mapping.
        dist.barrier()
        os.close(fd)


def late_rank(iters: int, warmup: int, late_ms: float) -> dict:
    """On one of 2 ranks: ``iters`` broadcasts (after ``warmup`` back to back) per transport and on the futex floor,
    rank 0 sleeping ``late_ms`` before each timed publish. Returns ``{"rank", "stamps_ns", "publish_ns", "cpu_s",
    "wall_s", "wait", "floor"}``: per path when rank 0 called (rank 0) or the reader returned (the others), on
    ``time.perf_counter_ns`` (the host's monotonic clock, the same in every process), what each publish cost
    rank 0, this rank's CPU and wall time over the timed steps, how a shm reader sleeps, and why the floor could
    not run (None when it ran)."""
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, futex_support, new_signal_group, shm_reader_sleep

    rank = dist.get_rank()
    late_s = late_ms / 1000.0
    groups = {name: new_signal_group(transport=name) for name in ("shm", "gloo")}
    calls: dict[str, Callable[[], object]] = {
        name: lambda group=group: broadcast_signal(SIGNAL_VALUE, src=0, group=group) for name, group in groups.items()
    }
    support = futex_support()
    floor = None
    if support.futex is not None:
        floor = FutexFloor(support.futex, shared_page(rank), src=rank == 0)
        calls["futex_floor"] = floor.call
    stamps: dict[str, list[int]] = {name: [] for name in calls}
    publish: dict[str, list[int]] = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    wall = dict.fromkeys(calls, 0.0)

    def timed_step(name: str) -> None:
        call = calls[name]
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        if rank == 0:
            time.sleep(late_s)
            called = time.perf_counter_ns()
            call()
            stamps[name].append(called)
            publish[name].append(time.perf_counter_ns() - called)
        else:
            call()
            stamps[name].append(time.perf_counter_ns())
        cpu[name] += time.process_time() - cpu_started
        wall[name] += time.perf_counter() - wall_started

    try:
        for call in calls.values():
            dist.barrier()
            # Back to back: a long gap costs only the timed steps.
            for _ in range(warmup):
                call()
        dist.barrier()
        # No barrier between the timed steps: a reader returns from one path's step and waits on the next path
        # while the src sleeps.
        for _ in range(iters):
            for name in calls:
                timed_step(name)
    finally:
        for group in groups.values():
            group.close()
        if floor is not None:
            floor.close()
    return {
        "rank": rank,
        "stamps_ns": stamps,
        "publish_ns": publish,
        "cpu_s": cpu,
        "wall_s": wall,
        "wait": list(shm_reader_sleep()),
        "floor": None if floor is not None else support.reason,
    }
