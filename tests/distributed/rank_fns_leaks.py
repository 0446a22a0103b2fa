"""What each real rank runs in ``test_shm_leaks.py``'s handshake tests: a creator left waiting inside the handshake
(for the test to SIGKILL), and a creator whose handshake fails on its global store.

Every function runs inside a rank of the ``paddle_ranks`` fixture's pool (after ``init_parallel_env()``) and
returns a JSON-able report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from unittest import mock

import paddle.distributed as dist

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import SHM_DIR, SignalGroupError, new_signal_group
from fastdeploy_patch.signal_group.shm_segment import ShmRing


def stalled_in_the_handshake(*, name_file: str, stall_s: float) -> dict:
    """Rank 0 creates the group's segment and waits inside the handshake for rank 1's answer; rank 1, given the
    segment's handle, writes its name to ``name_file`` and stalls there for up to ``stall_s`` (or until the name is
    gone) before it attaches. The test SIGKILLs rank 0 meanwhile; neither rank is meant to return."""
    attach = ShmRing.attach

    def stalled(handle: object, rank: int, **kwargs: object) -> ShmRing:
        ready = Path(name_file + ".tmp")
        ready.write_text(handle.name)
        ready.replace(name_file)
        deadline = time.monotonic() + stall_s
        while os.path.exists(os.path.join(SHM_DIR, handle.name)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return attach(handle, rank, **kwargs)

    with mock.patch.object(ShmRing, "attach", side_effect=stalled):
        group = new_signal_group(transport="shm")
    group.close()
    return {"rank": dist.get_rank()}


class _FailingStore:
    """The global store, but ``get`` of the key ending in ``fail_at`` raises ``failure`` (once the key is there);
    records the segment's name from the handle the creator publishes."""

    def __init__(self, store: object, fail_at: str, failure: BaseException) -> None:
        self._store = store
        self._fail_at = fail_at
        self._failure = failure
        self.name: str | None = None

    def set(self, key: str, value: str) -> None:
        if key.endswith("/shm/handle"):
            self.name = json.loads(value)["name"]
        self._store.set(key, value)

    def get(self, key: str) -> object:
        value = self._store.get(key)
        if key.endswith(self._fail_at):
            # After the real read: the other member has attached, so only the creator's way out is tested.
            raise self._failure
        return value

    def add(self, key: str, amount: int) -> int:
        return self._store.add(key, amount)


FAILURES = {
    "timeout": lambda: RuntimeError("the store's get timed out (a stand-in for Paddle's store timeout)"),
    "interrupt": KeyboardInterrupt,
}


def creator_fails_reading_the_answers(*, failure: str) -> dict:
    """Rank 0 creates the segment, publishes it, then its store fails (``failure``: a key of ``FAILURES``) while it
    reads rank 1's answer. Rank 0 reports what it raised and whether the segment's name is still in /dev/shm right
    after, while it is alive (its resource tracker has nothing to do); rank 1 attaches, then gets the group or
    learns of rank 0's failure, depending on which it sees first."""
    rank = dist.get_rank()
    if rank != 0:
        try:
            new_signal_group(transport="shm").close()
        except SignalGroupError as exc:
            # Rank 0's failure marker, when it came before rank 1 had seen every answer.
            return {"rank": rank, "raised": f"{type(exc).__name__}: {exc}"}
        return {"rank": rank, "raised": None}
    store = _FailingStore(paddle_internals.global_store(), "/shm/1", FAILURES[failure]())
    raised = None
    with mock.patch.object(paddle_internals, "global_store", return_value=store):
        try:
            new_signal_group(transport="shm")
        except BaseException as exc:  # noqa: BLE001 - the failure injected is what this reports
            raised = f"{type(exc).__name__}: {exc}"
    return {
        "rank": rank,
        "raised": raised,
        "name": store.name,
        "left": os.path.exists(os.path.join(SHM_DIR, store.name)),
    }
