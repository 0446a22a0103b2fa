"""The leak guard of the ``paddle_ranks`` plugin: what a test left behind, rank processes and /dev/shm segments.

Every rank the session's pools start carries ``RUN_TAG_VAR=RUN_TAG`` in its environment, and once the guard is in use
(``tag_this_process``) every signal-group segment that this process or a process it started creates carries
``SEGMENT_TAG`` in its name: the guard looks at this run's processes and this process's segments only, while other
xdist workers and other suites on the host create and remove theirs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from fastdeploy_patch import procfs
from fastdeploy_patch.signal_group import SEGMENT_PREFIX, SEGMENT_TAG_ENV, SHM_DIR

RUN_TAG_VAR = "PADDLE_RANKS_RUN"
"""Every rank of the session's pools carries this variable, set to ``RUN_TAG``; give it to any process a test starts
that the guard should watch."""
RUN_TAG = os.environ.get(RUN_TAG_VAR) or uuid.uuid4().hex
"""This run's tag: a pytest session started by a test of another, with the tag in its environment, belongs to that
run, and so do its ranks."""
SEGMENT_TAG = f"{RUN_TAG[:8]}p{os.getpid()}"
LEFTOVER_GRACE_S = 5.0
"""How long tagged processes get to end after a test: helpers (multiprocessing's resource tracker) exit on their own
once a rank is gone, and ranks of a retired pool are still being reaped."""
SEGMENT_GRACE_S = 1.0
"""A signal-group segment is unlinked within milliseconds of its creation: one still there after this long has
leaked (one seen only at the first look may belong to another run creating its group right then)."""


def tag_this_process() -> None:
    """Tag the signal-group segments this process and its children create from now on with ``SEGMENT_TAG`` (a tag
    set already, by the user or an earlier call, stays)."""
    os.environ.setdefault(SEGMENT_TAG_ENV, SEGMENT_TAG)


def tagged_processes(kept: Collection[int] = ()) -> dict[int, str]:
    """Live processes of this run (``RUN_TAG_VAR=RUN_TAG`` in their environment): ``{pid: command}``, but for those in
    the sessions ``kept`` (every rank leads a session of its own). Zombies hold nothing and are left out."""
    found = {}
    for pid in procfs.pids():
        try:
            now = procfs.stat(pid)
            if now is None or now.state == "Z" or now.session in kept:
                continue
            environ = procfs.environ(pid)
            if environ is not None and environ.get(RUN_TAG_VAR) == RUN_TAG:
                found[pid] = " ".join(procfs.cmdline(pid) or [])
        except OSError:
            continue  # not ours to read
    return found


def stray_processes(kept: Callable[[], Collection[int]] = list, grace: float = LEFTOVER_GRACE_S) -> dict[int, str]:
    """Tagged processes, but for the ranks ``kept()`` names, still alive after ``grace`` seconds; they are killed
    before being returned."""
    deadline = time.monotonic() + grace
    while (found := tagged_processes(kept())) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


def our_segments(prefixes: Iterable[str] = ()) -> set[str]:
    """The /dev/shm segments whose names start with this process's signal-group prefix or one of ``prefixes``."""
    shm = Path(SHM_DIR)
    tag = os.environ.get(SEGMENT_TAG_ENV)
    watched = tuple(prefixes) + ((f"{SEGMENT_PREFIX}{tag}_",) if tag else ())
    return {p.name for p in shm.iterdir() if p.name.startswith(watched)} if shm.is_dir() and watched else set()


def leaked_segments(before: set[str], prefixes: Iterable[str] = ()) -> set[str]:
    """Our segments that were not in ``before`` and are still there ``SEGMENT_GRACE_S`` after the first look."""
    prefixes = tuple(prefixes)
    new_segments = our_segments(prefixes) - before
    if new_segments:
        time.sleep(SEGMENT_GRACE_S)
        new_segments &= our_segments(prefixes)
    return new_segments


def leaks(before: set[str], prefixes: Iterable[str], pools: Any) -> list[str]:
    """What a test left behind, one sentence each (empty: nothing): tagged processes that are not ranks of the live
    ``pools`` (a ``RankPools`` or ``None``), killed by now, and segments not in ``before``."""
    problems = []
    strays = stray_processes(pools.live_pids if pools is not None else list)
    if strays:
        problems.append(f"rank processes outlived the test: {strays}")
    segments = leaked_segments(before, prefixes)
    if segments:
        problems.append(f"shared-memory segments leaked: {sorted(segments)}")
    return problems
