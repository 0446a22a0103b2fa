"""A wait for a child that has exited but is not reaped yet. Kept out of ``conftest``: the rank-pool tests' ranks
import their test module, and must not import the unit fakes (and Paddle's group modules) with it."""

from __future__ import annotations

import time

from fastdeploy_patch import procfs


def wait_until_a_zombie(pid: int, timeout: float = 30.0) -> procfs.Stat:
    """Wait until the child ``pid`` has exited but is not reaped yet (state ``Z``), so that its exit status is still
    there to read; return its stat. ``AssertionError`` when it is gone (reaped by someone else) or after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (now := procfs.stat(pid)) is None or now.state != "Z":
        assert now is not None, f"process {pid} is gone"
        assert time.monotonic() < deadline, f"process {pid} did not exit within {timeout:g} s"
        time.sleep(0.01)
    return now
