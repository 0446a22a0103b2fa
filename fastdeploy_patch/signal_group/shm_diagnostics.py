"""Diagnostics of shared memory on this host, for ``fastdeploy-patch doctor`` and the test harness: whether a
segment can be made and shared here (``check_shm_usable``), and which segments a dead creator left behind
(``leftover_segments``). The signal group itself never calls them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from fastdeploy_patch.signal_group import liveness
from fastdeploy_patch.signal_group.shm_layout import MAGIC, MAGIC_AT, WORD_BYTES, members_at, read_identity, slot_word
from fastdeploy_patch.signal_group.shm_segment import SEGMENT_PREFIX, SHM_DIR, ShmRing


def check_shm_usable(shm_dir: str = SHM_DIR) -> None:
    """Create, map twice, check and remove a tiny segment in ``shm_dir``; raise ``OSError`` with a readable reason
    when shared memory cannot work here."""
    if not os.path.isdir(shm_dir):
        raise OSError(errno.ENOENT, f"{shm_dir} is not a directory: shared memory needs a tmpfs mounted there")
    try:
        ring = ShmRing.create([0, 1], shm_dir=shm_dir)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create a shared-memory segment in {shm_dir}: {exc.strerror}") from exc
    try:
        other = ShmRing.attach(ring.handle, 1, shm_dir=shm_dir)
        try:
            ring.words[slot_word(2, 0)] = MAGIC
            if other.words[slot_word(2, 0)] != MAGIC:
                raise OSError(
                    errno.EIO,
                    f"a word stored through one mapping of a segment in {shm_dir} did not show through another",
                )
        finally:
            other.close()
    finally:
        ring.close()


@dataclass(frozen=True)
class Leftover:
    """A segment of this package whose creator is known to have exited: nobody can attach it any more."""

    path: str
    creator: liveness.ProcessIdentity
    reason: str
    """Why the creator is known gone (``liveness.gone_reason``)."""


def segment_creator(path: str) -> liveness.ProcessIdentity | None:
    """The creator recorded in the segment at ``path``; None when that cannot be read there: not this package's
    segment (its magic), too short, just being created (nothing recorded yet), or unreadable (gone meanwhile,
    another user's)."""
    try:
        with open(path, "rb") as segment:
            head = segment.read(members_at(1))
    except OSError:
        return None
    if len(head) < members_at(1):
        return None
    words = memoryview(head).cast("Q")
    if words[MAGIC_AT // WORD_BYTES] != MAGIC:
        return None
    return read_identity(words, 0)


def leftover_segments(shm_dir: str = SHM_DIR) -> list[Leftover]:
    """This package's segments in ``shm_dir`` whose creator is gone (pid and start time, through ``liveness``), by
    name. A creator that is alive, or that cannot be judged from here (another PID namespace, nothing recorded
    yet), keeps its segment off the list."""
    found = []
    names = sorted(os.listdir(shm_dir)) if os.path.isdir(shm_dir) else []
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        path = os.path.join(shm_dir, name)
        creator = segment_creator(path)
        reason = None if creator is None else liveness.gone_reason(creator)
        if reason is not None:
            found.append(Leftover(path, creator, reason))
    return found
