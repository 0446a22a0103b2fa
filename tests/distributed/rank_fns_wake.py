"""What each real rank runs in ``test_shm_wake.py``: a reader that wakes from its futex sleep when a late src
publishes, a reader that stays a whole ring behind the src, and a reader that dies while the src runs ahead.

Every function runs inside a rank of the ``paddle_ranks`` fixture's pool (after ``init_parallel_env()``) and
returns a JSON-able report; time stamps are ``time.monotonic()``, one clock for every process on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from unittest import mock

import paddle.distributed as dist

from fastdeploy_patch.signal_group import SignalGroupError, broadcast_signal, futex, new_signal_group
from fastdeploy_patch.signal_group.shm_layout import CURSOR_AT, WORD_BYTES, members_at
from fastdeploy_patch.testing import exit_after_reply


class _CountingFutex:
    """The real futex calls of one transport end, counted."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.waits = 0
        self.wakes = 0

    def wait(self, address: int, expected: int, seconds: float) -> str:
        self.waits += 1
        return self.real.wait(address, expected, seconds)

    def waker(self, address: int, count: int = 2**31 - 1) -> Callable[[], int]:
        wake = self.real.waker(address, count)

        def counted() -> int:
            self.wakes += 1
            return wake()

        return counted


def late_src_wake(late_ms: float, steps: int) -> dict:
    """Rank 0 sleeps ``late_ms`` before each publish; rank 1 waits meanwhile. Returns each call's (rank 0) or
    return's (rank 1) time, the values rank 1 received, the futex calls this rank made, and its CPU share."""
    rank = dist.get_rank()
    counting = _CountingFutex(futex.available().futex)
    # The transport takes its futex calls when it is made: count them from the start.
    with mock.patch.object(futex, "available", return_value=futex.Support(counting, "counted")):
        group = new_signal_group(transport="shm", timeout=60.0)
    stamps, received = [], []
    cpu, wall = time.process_time(), time.monotonic()
    try:
        for step in range(steps):
            if rank == 0:
                time.sleep(late_ms / 1000.0)
                stamps.append(time.monotonic())
                received.append(broadcast_signal(step, src=0, group=group))
            else:
                received.append(broadcast_signal(0, src=0, group=group))
                stamps.append(time.monotonic())
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    finally:
        group.close()
    return {
        "rank": rank,
        "stamps": stamps,
        "received": received,
        "waits": counting.waits,
        "wakes": counting.wakes,
        "cpu_share": cpu / wall,
    }


def _cursor(group: object, member: int) -> int:
    return group._endpoint._words[(members_at(member) + CURSOR_AT) // WORD_BYTES]


def slow_reader(lookahead: int, calls: int, reader_start_s: float, reader_pause_s: float) -> dict:
    """Rank 0 publishes ``calls`` values back to back; rank 1 starts ``reader_start_s`` late and pauses
    ``reader_pause_s`` between calls, so that the src keeps a whole ring ahead. Returns what each rank received
    and, on rank 0, how far ahead of rank 1's cursor it was after each publish."""
    rank = dist.get_rank()
    group = new_signal_group(transport="shm", timeout=60.0, lookahead=lookahead, initial=-1)
    received, ahead = [], []
    try:
        if rank == 1:
            time.sleep(reader_start_s)
        for call in range(calls):
            if rank == 0:
                received.append(broadcast_signal(1000 + call, src=0, group=group))
                ahead.append(call + 1 - _cursor(group, 1))
            else:
                received.append(broadcast_signal(0, src=0, group=group))
                time.sleep(reader_pause_s)
    finally:
        group.close()
    return {"rank": rank, "received": received, "ahead": ahead}


def reader_dies(lookahead: int, reader_calls: int, src_pause_s: float, max_calls: int) -> dict:
    """Rank 1 makes ``reader_calls`` calls and exits; rank 0 goes on publishing every ``src_pause_s`` until its
    broadcast fails (at most ``max_calls`` calls). Returns when rank 1 exited, and when and how rank 0 failed."""
    rank = dist.get_rank()
    group = new_signal_group(transport="shm", timeout=60.0, lookahead=lookahead)
    if rank == 1:
        for _ in range(reader_calls):
            broadcast_signal(0, src=0, group=group)
        exit_after_reply({"rank": rank, "exited_at": time.monotonic()})
    failed = None
    try:
        for call in range(max_calls):
            try:
                broadcast_signal(call, src=0, group=group)
            except SignalGroupError as exc:
                failed = {"call": call, "at": time.monotonic(), "message": str(exc)}
                break
            time.sleep(src_pause_s)
    finally:
        group.close()
    return {"rank": rank, "failed": failed}
