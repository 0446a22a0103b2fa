"""Shared fixtures for real multi-rank tests: every test here is marked ``distributed``, has a timeout, and
fails if it leaves a rank process or one of its shared-memory segments behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.signal_group import SEGMENT_PREFIX, SHM_DIR
from tests.distributed.harness import RUN_TAG, RUN_TAG_VAR

# Tagged with this run: other runs on a shared machine make status segments of their own meanwhile.
SHM_PREFIX = f"fdp_dist_{RUN_TAG[:8]}_"
DEFAULT_TEST_TIMEOUT_S = 150
LEFTOVER_GRACE_S = 5.0
SEGMENT_GRACE_S = 1.0
"""A signal-group segment is unlinked within milliseconds of its creation: one still there after this long has
leaked (one seen only at the first look may belong to another run creating its group right then)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.distributed)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


def tagged_processes() -> dict[int, str]:
    """Live processes started by this test run (ranks and anything they spawned): ``{pid: command}``.

    Zombies are left out: they hold no resources and only wait for their new parent to reap them.
    """
    found = {}
    needle = f"{RUN_TAG_VAR}={RUN_TAG}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def stray_processes(grace: float = LEFTOVER_GRACE_S) -> dict[int, str]:
    """Tagged processes still alive after ``grace`` seconds; they are killed before being returned.

    The grace covers helpers (multiprocessing's resource tracker) that exit on their own once a rank is gone.
    """
    deadline = time.monotonic() + grace
    while (found := tagged_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


def our_segments() -> set[str]:
    """The segments this suite's status signals and the signal groups' rings leave in /dev/shm."""
    shm = Path(SHM_DIR)
    prefixes = (SHM_PREFIX, SEGMENT_PREFIX)
    return {p.name for p in shm.iterdir() if p.name.startswith(prefixes)} if shm.is_dir() else set()


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    segments_before = our_segments()
    yield
    leftovers = stray_processes()
    assert not leftovers, f"rank processes outlived the test: {leftovers}"
    new_segments = our_segments() - segments_before
    if new_segments:
        time.sleep(SEGMENT_GRACE_S)
        new_segments &= our_segments()
    assert not new_segments, f"shared-memory segments leaked: {sorted(new_segments)}"


def new_status_signal(initial: int = 0) -> StatusSignal:
    """A status segment owned by the test process (the engine's role), under this suite's name prefix."""
    return StatusSignal(f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}", create=True, initial=initial)


@pytest.fixture
def status_signal() -> Iterator[StatusSignal]:
    with new_status_signal() as signal:
        yield signal
