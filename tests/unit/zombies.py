"""A wait for a child that has exited but is not reaped yet. Kept out of ``conftest``: the rank-pool tests' ranks
import their test module, and must not import the unit fakes (and Paddle's group modules) with it."""

from __future__ import annotations

import time
from pathlib import Path


def wait_until_a_zombie(pid: int, timeout: float = 30.0) -> list[str]:
    """Wait until the child ``pid`` has exited but is not reaped yet (state ``Z``), so that its exit status is still
    there to read; return its ``/proc/<pid>/stat`` fields after the command name. ``AssertionError`` after
    ``timeout`` seconds."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while (fields := stat.read_text().rsplit(")", 1)[1].split())[0] != "Z":
        assert time.monotonic() < deadline, f"process {pid} did not exit within {timeout:g} s"
        time.sleep(0.01)
    return fields
