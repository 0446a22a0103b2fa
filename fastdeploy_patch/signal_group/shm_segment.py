"""The shared-memory segment's whole lifetime, in one place: its name, ``create``, ``attach``, ``unlink`` and
``close`` (``ShmRing``), and the handle that lets a member attach it.

The segment is a file made with ``os.open(O_CREAT | O_EXCL, 0o600)``, sized with ``posix_fallocate`` and mapped
with ``mmap``; ``multiprocessing.shared_memory`` is not used: it registers the segment with the resource tracker in
every process that attaches, and that tracker would unlink it when such a process exits (Python < 3.13 has no
``track=False``); ``posix_fallocate`` also makes a full /dev/shm fail here with ``ENOSPC`` instead of a SIGBUS at
the first store.

Who removes the name. The creator unlinks it as soon as every member has reported attached, or on any exception
or timeout out of the handshake (see ``rendezvous``); from then on the mapping lives exactly as long as the
processes that use it. Until then, a creator killed at any moment (SIGKILL, the OOM killer) runs no code of its
own, so the creator alone registers the name with ``multiprocessing.resource_tracker`` (a helper process per
creator, which unlinks what a dead creator left registered) before the file exists, and unregisters it once the
name is gone. Attachers never register: they must never unlink. What is still left (a tracker killed with its
creator, say by a kill of the whole process group) is found by ``leftover_segments``: ``fastdeploy-patch doctor``
lists it and ``doctor --clean`` removes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import resource_tracker

from fastdeploy_patch.signal_group import liveness
from fastdeploy_patch.signal_group.shm_layout import (
    LAYOUT_VERSION,
    MAGIC,
    MAGIC_AT,
    MEMBERS_AT,
    NONCE_AT,
    PID_AT,
    PIDNS_AT,
    SHM_RING_SLOTS,
    SLOTS_AT,
    START_AT,
    VERSION_AT,
    WORD_BYTES,
    member_word,
    read_identity,
    segment_bytes,
)

SHM_DIR = "/dev/shm"
"""Where segments live: the tmpfs that POSIX shared memory uses on Linux."""

SEGMENT_PREFIX = "fdp_signal_"
"""Every segment's file name starts with this (then SEGMENT_TAG_ENV's tag and ``_`` when it is set, then a random
token); leak checks and ``doctor`` scan SHM_DIR for it."""

SEGMENT_TAG_ENV = "FASTDEPLOY_PATCH_SEGMENT_TAG"
"""When set, every segment this process creates is named SEGMENT_PREFIX + tag + ``_`` + the random token. A test suite
sets it for its processes, so that its leak checks look only at its own segments while other suites on the host
create and remove theirs."""

_TAG = re.compile(r"[A-Za-z0-9]{1,32}")


def segment_tag() -> str:
    """The tag that SEGMENT_TAG_ENV sets ('' when unset or empty). Raises ``ValueError`` naming the variable when it
    is not 1 to 32 ASCII letters and digits (a name in /dev/shm must not take a path separator or a dot)."""
    tag = os.environ.get(SEGMENT_TAG_ENV, "")
    if tag and not _TAG.fullmatch(tag):
        raise ValueError(f"{SEGMENT_TAG_ENV} must be 1 to 32 ASCII letters and digits, got {tag!r}")
    return tag


_TRACKED_TYPE = "shared_memory"
"""The resource tracker's name for POSIX shared memory: it removes a name of this type with ``shm_unlink``, which
reaches only SHM_DIR."""


@dataclass(frozen=True)
class ShmHandle:
    """What a member needs to attach: sent by the creator to the others through the rendezvous store."""

    name: str
    size: int
    ranks: tuple[int, ...]
    layout_version: int
    nonce: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "size": self.size,
                "ranks": list(self.ranks),
                "layout_version": self.layout_version,
                "nonce": self.nonce,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ShmHandle:
        fields = json.loads(text)
        return cls(fields["name"], fields["size"], tuple(fields["ranks"]), fields["layout_version"], fields["nonce"])


def _tracker_name(name: str) -> str:
    # shm_unlink's name: SHM_DIR's file name after a slash.
    return "/" + name


def _new_mapping(path: str, size: int) -> mmap.mmap:
    """Create the file ``path`` (never an existing one), size it and map it; the file is removed again when sizing
    or mapping fails."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


class ShmRing:
    """One member's mapping of a group's segment. Make it with ``create`` (one member) or ``attach`` (the others)."""

    def __init__(self, handle: ShmHandle, path: str, region: mmap.mmap, *, creator: bool, tracked: bool) -> None:
        self.handle = handle
        self.path = path
        self._region = region
        self.words = memoryview(region).cast("Q")
        # Where the mapping starts, for futex calls; the temporary ctypes view is released at once, so that
        # close() can unmap.
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        self._creator = creator
        self._linked = creator
        self._tracked = tracked

    @classmethod
    def create(cls, ranks: list[int], *, shm_dir: str = SHM_DIR) -> ShmRing:
        """Create, size and map a new segment for the sorted ``ranks``, and record this process in it as the first
        member, its creator. In SHM_DIR the name is registered with the resource tracker until ``unlink``.

        Raises ``OSError`` when the segment cannot be made (no /dev/shm, full, not permitted), ``ValueError`` for a
        bad SEGMENT_TAG_ENV."""
        tag = segment_tag()
        name = SEGMENT_PREFIX + (f"{tag}_" if tag else "") + secrets.token_hex(8)
        path = os.path.join(shm_dir, name)
        size = segment_bytes(len(ranks))
        tracked = shm_dir == SHM_DIR
        if tracked:
            # Before the file exists, so that no moment is left at which a SIGKILL leaves the name behind; the
            # tracker's shm_unlink of a name never created only warns.
            resource_tracker.register(_tracker_name(name), _TRACKED_TYPE)
        try:
            region = _new_mapping(path, size)
        except BaseException:
            if tracked:
                resource_tracker.unregister(_tracker_name(name), _TRACKED_TYPE)
            raise
        handle = ShmHandle(name, size, tuple(ranks), LAYOUT_VERSION, secrets.randbits(64))
        ring = cls(handle, path, region, creator=True, tracked=tracked)
        for at, word in (
            (MAGIC_AT, MAGIC),
            (VERSION_AT, LAYOUT_VERSION),
            (SLOTS_AT, SHM_RING_SLOTS),
            (MEMBERS_AT, len(ranks)),
            (NONCE_AT, handle.nonce),
        ):
            ring.words[at // WORD_BYTES] = word
        ring._record(0)
        return ring

    @classmethod
    def attach(cls, handle: ShmHandle, rank: int, *, shm_dir: str = SHM_DIR) -> ShmRing:
        """Map the segment ``handle`` names and record ``rank`` (this process) in it.

        Raises ``OSError`` saying why when the segment is not there (another host, another mount namespace) or is
        not the one the handle describes."""
        path = os.path.join(shm_dir, handle.name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as exc:
            raise OSError(
                errno.ENOENT,
                f"{path} does not exist here (is this rank on another host, or in another mount namespace?)",
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if size != handle.size:
                raise OSError(errno.EINVAL, f"{path} holds {size} bytes, but the group's segment has {handle.size}")
            region = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        ring = cls(handle, path, region, creator=False, tracked=False)
        expected = {
            MAGIC_AT: MAGIC,
            VERSION_AT: handle.layout_version,
            SLOTS_AT: SHM_RING_SLOTS,
            MEMBERS_AT: len(handle.ranks),
            NONCE_AT: handle.nonce,
        }
        found = {at: ring.words[at // WORD_BYTES] for at in expected}
        if found != expected or handle.layout_version != LAYOUT_VERSION:
            ring.close()
            raise OSError(
                errno.EINVAL,
                f"{path} is not the group's segment (its header does not match the handle: another host's file of "
                f"the same name, or mixed fastdeploy_patch versions; this one speaks layout {LAYOUT_VERSION})",
            )
        ring._record(handle.ranks.index(rank))
        return ring

    def _record(self, member: int) -> None:
        me = liveness.this_process()
        self.words[member_word(member, PID_AT)] = me.pid
        self.words[member_word(member, START_AT)] = me.start_ticks
        self.words[member_word(member, PIDNS_AT)] = me.pid_namespace

    def identity(self, member: int) -> liveness.ProcessIdentity:
        """The process recorded for member index ``member``."""
        return read_identity(self.words, member)

    def unlink(self) -> None:
        """Remove the segment's name (creator only; once) and its tracker registration. Mappings stay valid until
        their processes unmap."""
        if self._linked:
            self._linked = False
            # Someone else (an operator's clean-up of /dev/shm) may have removed the name already; the mappings
            # do not need it, so closing must still succeed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            if self._tracked:
                resource_tracker.unregister(_tracker_name(self.handle.name), _TRACKED_TYPE)

    def close(self) -> None:
        """Unmap (and, on the creator, unlink if that has not happened yet). Idempotent."""
        if self._creator:
            self.unlink()
        if not self._region.closed:
            self.words.release()
            self._region.close()
