"""The shared-memory signal transport: a ring of packed 8-byte slots in one segment under /dev/shm.

Segment layout (every number below is a named constant of this module; all words are native uint64,
little-endian on x86-64 and AArch64)::

    offset                          what                                             written by
    0                     HEADER    MAGIC_AT      magic "FDPSIG" + 0x0001          creator, once
                                    VERSION_AT    LAYOUT_VERSION                   creator, once
                                    SLOTS_AT      SHM_RING_SLOTS                   creator, once
                                    MEMBERS_AT    member count                     creator, once
                                    NONCE_AT      random 64-bit nonce (in handle)  creator, once
                                    BROKEN_AT     0, or r + 1: rank r found gone   any member that finds it
    HEADER_BYTES (64)     MEMBER i  + CURSOR_AT   values consumed by member i      member i, every call
      + i * MEMBER_BYTES            + PID_AT      pid of member i                  member i, at attach
      (one 64-byte line             + START_AT    its start time (clock ticks)     member i, at attach
       per member; member           + PIDNS_AT    its PID-namespace inode          member i, at attach
       0 is the creator)            + PARKED_AT   m + 1 while member i may sleep   member i, when it parks
                                                  in FUTEX_WAIT for call m; else 0   and when it returns
    ring_at(n)            SLOT k    pack_slot(call, value):                        the src of the call
      + k * SLOT_BYTES                sequence_of(call) << SEQUENCE_SHIFT
                                      | (value & 0xffffffff)
                                    k = call % SHM_RING_SLOTS, sequence_of(call) = (call + 1) mod 2**32

A slot's word means:

    slot_sequence(word) == sequence_of(m)   the value of call m is published; a reader of call m takes
                                            slot_value(word)
    anything else (0 at start)              call m is not published yet; its reader waits

Protocol, for call number n (counted from 0 on every member; every member makes the same calls). Each call is
two steps, in this order: the src publishes (``_publish``), then every member takes (``_take``).

- Publish, on the writer (the call's src) only. Room first: every member's cursor >= n - SHM_RING_SLOTS + 1, so
  the slot it is about to overwrite (call n - SHM_RING_SLOTS) has been consumed by all (one comparison on the fast
  path; a wait only when the ring is full). Then the store of slot n % SLOTS, then the wake of its sleepers.
  Nothing else runs before the store: no clock read, no ``/proc`` read, no bookkeeping, so that a reader waiting
  for this value gets it as soon as the src calls.
- Take, with lookahead d, on every member (the writer too): return the value of call m = n - d. Wait until slot
  m % SLOTS holds sequence_of(m), read the value, and set the cursor to m + 1. The first d calls return the
  group's initial value and consume nothing. A writer never waits for itself: its cursor is n - d and
  d <= SLOTS // 2.
- A reader that has waited past its spin and yield phases parks (see ``waiting`` and ``futex``): it stores m + 1
  at its PARKED_AT, looks at slot m once more, and sleeps in ``FUTEX_WAIT`` on the slot's sequence half
  (``SEQUENCE_HALF_AT``) while it still holds the sequence it saw. The writer, after storing slot n, calls
  ``FUTEX_WAKE`` on it only when some member's PARKED_AT holds n + 1: the fast path, where readers spin or yield,
  costs a load per member and no syscall. One announcement word per member, not a waiter count per group: each
  word has a single writer in its own cache line, so plain stores do (a shared count needs an atomic
  read-modify-write, which Python cannot do on shared memory, and one lost update would wake nobody, or everybody,
  forever), and it names the call the reader sleeps for, so a writer never wakes for a call nobody waits on.
- A waiter judges liveness only of the members it waits on (the src of call m, or the readers behind), and only
  while its condition is unmet: a src that published and then exited fails nobody. A member that finds a peer
  gone records it at BROKEN_AT, so that the other members fail fast instead of waiting for their timeout.
- Between the two steps, after its publish, the writer looks at its readers, at most every
  ``LIVENESS_INTERVAL_S`` (a clock read per call, ``/proc`` only then), so that a dead reader fails the src within
  a second instead of a ring (64 calls) later; the value it just published stays published for the live readers.
  A reader counts as lost only when it is gone and its cursor is not past the writer's own (and the writer has
  taken a value): it then made no more calls than the writer, so it can never make this one. A reader that made
  every call and exited (with a lookahead it may finish d calls before the writer) has a cursor past the
  writer's and fails nobody.

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

import collections
import contextlib
import ctypes
import errno
import json
import mmap
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker

from fastdeploy_patch.signal_group import futex, liveness, waiting
from fastdeploy_patch.signal_group.errors import SignalGroupError, lost_peer_message, stuck_peer_message

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


SHM_RING_SLOTS = 64
"""Slots in the ring: how far the src may run ahead of the slowest reader (minus the lookahead). A power of two,
so that a call's slot is ``call & (SHM_RING_SLOTS - 1)``."""

LAYOUT_VERSION = 2
"""Version 2 added PARKED_AT (the futex announcement); members of another version refuse to attach."""
MAGIC = int.from_bytes(b"FDPSIG\x00\x01", "little")

WORD_BYTES = 8
HEADER_BYTES = 64
MAGIC_AT = 0
VERSION_AT = 8
SLOTS_AT = 16
MEMBERS_AT = 24
NONCE_AT = 32
BROKEN_AT = 40

# One cache line per member: each member stores its cursor every call, and must not slow the others' lines.
MEMBER_BYTES = 64
CURSOR_AT = 0
PID_AT = 8
START_AT = 16
PIDNS_AT = 24
PARKED_AT = 32

SLOT_BYTES = 8
SEQUENCE_SHIFT = 32
"""A slot word holds its sequence in the high 32 bits and the value in the low 32."""
SEQUENCE_HALF_AT = 4 if sys.byteorder == "little" else 0
"""Byte offset of the sequence half inside a native slot word: the 32-bit word a reader sleeps on."""
_SLOT_MASK = SHM_RING_SLOTS - 1
_HALF_MASK = 0xFFFFFFFF
_SIGN_BIT = 0x80000000

_TRACKED_TYPE = "shared_memory"
"""The resource tracker's name for POSIX shared memory: it removes a name of this type with ``shm_unlink``, which
reaches only SHM_DIR."""


def members_at(member: int) -> int:
    """Byte offset of member ``member``'s record (its index among the sorted ranks)."""
    return HEADER_BYTES + member * MEMBER_BYTES


def ring_at(members: int) -> int:
    """Byte offset of slot 0 in a segment for ``members`` members."""
    return members_at(members)


def segment_bytes(members: int) -> int:
    """The size of a segment for ``members`` members."""
    return ring_at(members) + SHM_RING_SLOTS * SLOT_BYTES


def member_word(member: int, field: int) -> int:
    """The word index of ``field`` (``CURSOR_AT``, ``PID_AT``, ...) in member ``member``'s record."""
    return (members_at(member) + field) // WORD_BYTES


def slot_word(members: int, call: int) -> int:
    """The word index of the slot that carries call ``call``'s value, in a segment for ``members`` members."""
    return ring_at(members) // WORD_BYTES + (call & _SLOT_MASK)


def sequence_of(call: int) -> int:
    """The sequence that marks call ``call``'s value as published: call + 1, modulo 2**32 (0 is never published)."""
    return (call + 1) & _HALF_MASK


def pack_slot(call: int, value: int) -> int:
    """The slot word that publishes int32 ``value`` as call ``call``'s."""
    return (sequence_of(call) << SEQUENCE_SHIFT) | (value & _HALF_MASK)


def slot_sequence(word: int) -> int:
    """The sequence a slot word holds."""
    return word >> SEQUENCE_SHIFT


def slot_value(word: int) -> int:
    """The int32 a slot word holds."""
    value = word & _HALF_MASK
    return value - (1 << 32) if value & _SIGN_BIT else value


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
        return _identity(self.words, member)

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


def _identity(words: memoryview, member: int) -> liveness.ProcessIdentity:
    return liveness.ProcessIdentity(
        words[member_word(member, PID_AT)], words[member_word(member, START_AT)], words[member_word(member, PIDNS_AT)]
    )


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
    return _identity(words, 0)


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


class ShmTransport:
    """One member's end of a shared-memory signal group: ``broadcast`` is the per-call protocol above."""

    def __init__(self, ring: ShmRing, rank: int, *, timeout: float, lookahead: int, initial: int) -> None:
        self.ring = ring
        self._ranks = list(ring.handle.ranks)
        self._members = len(self._ranks)
        self._words = ring.words
        self._timeout = timeout
        self._lookahead = lookahead
        self._initial = initial
        me = self._ranks.index(rank)
        self._cursors = [member_word(i, CURSOR_AT) for i in range(self._members)]
        self._my_cursor = self._cursors[me]
        self._others = [i for i in range(self._members) if i != me]
        self._announcements = [member_word(i, PARKED_AT) for i in range(self._members)]
        self._my_parked = self._announcements[me]
        self._futex = futex.available().futex
        # The announcements a writer reads after each store; none without futex, where nobody parks.
        self._parked = [member_word(i, PARKED_AT) for i in self._others] if self._futex else []
        # The word index and the futex wake of each slot, by call % SHM_RING_SLOTS: made once, so that a publish
        # after an idle spell runs as few instructions as it can before its wake.
        self._slots = [slot_word(self._members, call) for call in range(SHM_RING_SLOTS)]
        self._wakers = [self._futex.waker(self._sequence_address(at)) for at in self._slots] if self._futex else []
        self._calls = 0
        # The srcs of the last lookahead + 1 calls: the first is the src of the call whose value we return.
        self._srcs: collections.deque[int] = collections.deque(maxlen=lookahead + 1)
        # The writer may publish every call up to this one without looking at the cursors again.
        self._room_until = SHM_RING_SLOTS - 1
        self._next_reader_check = 0.0

    def broadcast(self, value: int | None, src: int) -> int:
        """Publish ``value`` (on src; None elsewhere) as this call's value and return call n - lookahead's."""
        n = self._calls
        if value is not None:
            self._publish(n, value, src)
        self._srcs.append(src)
        self._calls = n + 1
        if value is not None:
            self._look_at_readers(n, src)
        return self._take(n - self._lookahead, src)

    def _publish(self, n: int, value: int, src: int) -> None:
        """Make ``value`` call ``n``'s, visible to every reader, and wake those asleep on it: room, store, wake,
        and nothing before them."""
        if n > self._room_until:
            self._make_room(n, src)
        words = self._words
        index = n & _SLOT_MASK
        # The publishing store: sequence and value in one aligned 8-byte word, which x86-64 and AArch64 store
        # single-copy atomically, so a reader sees the old word or the new one whole and needs no fence. (The
        # cursor store that follows a reader's load depends on the loaded sequence, which orders the two.)
        words[self._slots[index]] = pack_slot(n, value)
        announced = n + 1
        for at in self._parked:
            if words[at] == announced:
                self._wakers[index]()
                break

    def _take(self, m: int, src: int) -> int:
        """Call ``m``'s value, once it is published (the group's initial value for m < 0); consumes it."""
        if m < 0:
            return self._initial
        words = self._words
        slot = self._slots[m & _SLOT_MASK]
        sequence = sequence_of(m)
        word = words[slot]
        if slot_sequence(word) != sequence:
            self._wait_for_value(slot, sequence, m, src)
            word = words[slot]
        words[self._my_cursor] = m + 1
        return slot_value(word)

    def _sequence_address(self, slot: int) -> int:
        """The address of the 32-bit sequence half of slot word ``slot``: the word readers park on."""
        return self.ring.address + slot * WORD_BYTES + SEQUENCE_HALF_AT

    def _min_cursor(self) -> int:
        return min(self._words[at] for at in self._cursors)

    def _make_room(self, n: int, src: int) -> None:
        needed = n - SHM_RING_SLOTS + 1
        if self._min_cursor() < needed:
            words, cursors = self._words, self._cursors

            def behind() -> list[int]:
                return [i for i, at in enumerate(cursors) if words[at] < needed]

            self._wait(
                lambda: all(words[at] >= needed for at in cursors),
                behind,
                src,
                lambda late: f" (ranks {late} have not taken the value of call {n - SHM_RING_SLOTS} yet)",
            )
        self._room_until = self._min_cursor() + SHM_RING_SLOTS - 1

    def _look_at_readers(self, n: int, src: int) -> None:
        """On the writer, after its publish of call ``n``, at most every ``LIVENESS_INTERVAL_S``: raise
        ``SignalGroupError`` for a reader that is gone without having made as many calls as this writer has (see
        the protocol), or that another member found gone."""
        now = time.monotonic()
        if now >= self._next_reader_check:
            self._next_reader_check = now + waiting.LIVENESS_INTERVAL_S
            lost = self._find_lost(lambda: self._gone_behind(n), src, now)
            if lost is not None:
                raise lost

    def _gone_behind(self, n: int) -> tuple[int, str] | None:
        words = self._words
        mine = words[self._my_cursor]
        if mine == 0:
            # Before the writer's first value, a reader that made every call so far has a cursor of 0 too.
            return None
        announced = n + 1
        for member in self._others:
            # A reader that announced it sleeps for this very call was alive after the last publish, and is being
            # woken right now: its /proc read, up to hundreds of microseconds after an idle spell, would take the
            # CPU it may be woken on. Were it dead, its announcement is stale at the next call, which judges it.
            if words[self._cursors[member]] <= mine and words[self._announcements[member]] != announced:
                found = self._gone([member])
                # Judged gone first, then the cursor read again: a reader that took one more value before it
                # exited has stored its cursor before it exited.
                if found is not None and words[self._cursors[member]] <= mine:
                    return found
        return None

    def _gone(self, members: list[int]) -> tuple[int, str] | None:
        """The first of ``members`` (member indexes) known to have exited, with why; None when all may be alive."""
        for member in members:
            reason = liveness.gone_reason(self.ring.identity(member))
            if reason is not None:
                return member, reason
        return None

    def _find_lost(
        self, judge: Callable[[], tuple[int, str] | None], src: int, started: float
    ) -> SignalGroupError | None:
        """The error for a member found gone: by another member (the mark at BROKEN_AT), else by ``judge()``,
        whose find is marked there for the others."""
        broken = self._words[BROKEN_AT // WORD_BYTES]
        if broken:
            detail = f"rank {broken - 1} exited, as another member found"
        else:
            found = judge()
            if found is None:
                return None
            member, reason = found
            self._words[BROKEN_AT // WORD_BYTES] = self._ranks[member] + 1
            detail = f"rank {self._ranks[member]}: {reason}"
        return SignalGroupError(lost_peer_message(self._ranks, src, time.monotonic() - started, detail))

    def _wait_for_value(self, slot: int, sequence: int, m: int, src: int) -> None:
        words = self._words
        writer = self._ranks.index(self._srcs[0])
        park = None
        if self._futex is not None:
            wait, address, parked = self._futex.wait, self._sequence_address(slot), self._my_parked

            def park(seconds: float) -> None:
                # The futex contract: announce, then look once more, then sleep only while the slot still holds
                # what we saw (the kernel compares it atomically with going to sleep).
                words[parked] = m + 1
                seen = slot_sequence(words[slot])
                if seen != sequence:
                    wait(address, seen, seconds)

        try:
            self._wait(
                lambda: slot_sequence(words[slot]) == sequence,
                lambda: [writer],
                src,
                lambda late: f" (rank {late[0]} has not published the value of call {m})",
                park,
            )
        finally:
            words[self._my_parked] = 0

    def _wait(
        self,
        ready: Callable[[], bool],
        waited_on: Callable[[], list[int]],
        src: int,
        stuck_detail: Callable[[list[int]], str],
        park: Callable[[float], object] | None = None,
    ) -> None:
        """Wait until ``ready()``; ``waited_on()`` gives the member indexes whose liveness matters meanwhile.

        Raises ``SignalGroupError`` for a member found gone (and marks the segment so that the others know), and
        ``TimeoutError`` after the group's timeout, naming the late ranks through ``stuck_detail``."""
        started = time.monotonic()

        def find_lost() -> SignalGroupError | None:
            return self._find_lost(lambda: self._gone(waited_on()), src, started)

        if not waiting.wait_until(ready, self._timeout, find_lost, park):
            late = [self._ranks[i] for i in waited_on()]
            raise TimeoutError(
                stuck_peer_message(self._ranks, src, time.monotonic() - started, self._timeout, stuck_detail(late))
            )

    def close(self) -> None:
        """Unmap the segment; this end cannot be used afterwards."""
        self.ring.close()
