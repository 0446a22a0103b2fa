"""``FUTEX_WAIT`` and ``FUTEX_WAKE`` on a 32-bit word of a shared file mapping, through libc's ``syscall``.

A shared-memory reader that has waited past its spin and yield phases sleeps in the kernel on the sequence half
of the slot it waits for, and the src wakes it right after the publishing store, so a value published after a
long wait is seen within a wake-up (tens of microseconds) instead of a sleep step (up to 1 ms).

The contract the transport follows: the reader first announces that it may sleep (a word in its own member line,
see ``shm_transport``), then looks at the slot once more, then calls ``wait(address, seen)`` with the sequence it
saw. The kernel compares the word with ``seen`` atomically with going to sleep, so a value that lands at any
point before the sleep makes ``FUTEX_WAIT`` return at once (``EAGAIN``). The src, after its store, reads the
announcements and calls ``FUTEX_WAKE`` only when a reader announced the call it just published.

**Lost wake-up bound.** One race remains: nothing fences the src's publishing store from its later load of the
announcements (Python has no fence, and a locked instruction on every publish would cost the fast path), so on
x86-64 (store-to-load reordering) and AArch64 the src may read "nobody announced" while the reader, having just
announced, still sees the old sequence and sleeps. That can happen only to the first sleep after an announcement:
the kernel's ``FUTEX_WAIT`` runs a full barrier (``smp_mb``) before it reads the word, so from then on the
announcement is visible to every later load of the src, which then wakes every later sleep of that wait. The
first sleep of a wait is therefore short, ``waiting.FUTEX_FIRST_WAIT_S`` (1 ms): a lost wake-up costs at most
that, once. Later sleeps last until the waiter's next liveness check.

Only the shared futex operations are used. ``FUTEX_PRIVATE_FLAG`` keys a futex on the calling process's address
space, so a waiter and a waker in two processes would never meet, even on the same file mapping.

Where this cannot work (not Linux, a libc ctypes cannot load, an architecture whose syscall number we do not
know, a kernel or sandbox that refuses the call), ``available()`` says why and the waiter keeps its capped-sleep
phase.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
"""``SYS_futex`` by ``platform.machine()``: x86-64 (``arch/x86/entry/syscalls/syscall_64.tbl``) and AArch64 (the
generic table, ``include/uapi/asm-generic/unistd.h``)."""

FUTEX_WAIT = 0
FUTEX_WAKE = 1

WAKE_ALL = 2**31 - 1
"""``FUTEX_WAKE``'s count that wakes every waiter (INT_MAX)."""


class Timespec(ctypes.Structure):
    """``struct timespec`` on LP64 Linux: the relative timeout of ``FUTEX_WAIT``."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def timespec(seconds: float) -> Timespec:
    """``seconds`` (>= 0) as a ``Timespec``."""
    nanoseconds = max(0, round(seconds * 1e9))
    return Timespec(nanoseconds // 1_000_000_000, nanoseconds % 1_000_000_000)


Syscall = Callable[..., int]


@dataclass(frozen=True)
class Futex:
    """The futex calls through ``syscall`` (libc's, or a fake in tests) with syscall number ``number``."""

    syscall: Syscall
    number: int
    get_errno: Callable[[], int] = ctypes.get_errno

    def wait(self, address: int, expected: int, seconds: float) -> str:
        """Sleep while the 32-bit word at ``address`` holds ``expected``, for at most ``seconds``.

        Returns why it returned: ``"woken"`` (a wake, or a spurious return), ``"changed"`` (``EAGAIN``: the word no
        longer held ``expected``), ``"interrupted"`` (``EINTR``: a signal) or ``"timed out"`` (``ETIMEDOUT``). The
        caller looks at the word again in every case. Any other error raises ``OSError``."""
        limit = timespec(seconds)
        result = self.syscall(
            ctypes.c_long(self.number),
            ctypes.c_void_p(address),
            ctypes.c_long(FUTEX_WAIT),
            ctypes.c_long(expected),
            ctypes.byref(limit),
            None,
            ctypes.c_long(0),
        )
        if result == 0:
            return "woken"
        code = self.get_errno()
        if code == errno.EAGAIN:
            return "changed"
        if code == errno.EINTR:
            return "interrupted"
        if code == errno.ETIMEDOUT:
            return "timed out"
        raise OSError(code, f"FUTEX_WAIT failed: {os.strerror(code)}")

    def wake(self, address: int, count: int = WAKE_ALL) -> int:
        """Wake up to ``count`` waiters on the word at ``address``; returns how many were woken. ``OSError`` on
        failure."""
        return self.waker(address, count)()

    def waker(self, address: int, count: int = WAKE_ALL) -> Callable[[], int]:
        """``wake(address, count)`` as a call without arguments, whose syscall arguments are made once, here: a src
        that publishes after an idle spell runs its first instructions from cold caches, at several microseconds
        each, and every one it runs before the wake is added to the reader's wake-up."""
        call = functools.partial(
            self.syscall,
            ctypes.c_long(self.number),
            ctypes.c_void_p(address),
            ctypes.c_long(FUTEX_WAKE),
            ctypes.c_long(count),
            None,
            None,
            ctypes.c_long(0),
        )

        def wake() -> int:
            result = call()
            if result < 0:
                code = self.get_errno()
                raise OSError(code, f"FUTEX_WAKE failed: {os.strerror(code)}")
            return result

        return wake


@dataclass(frozen=True)
class Support:
    """Whether futex waits work here: ``futex`` is None when they do not, and ``reason`` says why."""

    futex: Futex | None
    reason: str


def _libc_syscall() -> Syscall:
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    return syscall


def probe(
    system: str, machine: str, load_syscall: Callable[[], Syscall], get_errno: Callable[[], int] = ctypes.get_errno
) -> Support:
    """Whether futex calls work for ``system``/``machine`` with the syscall ``load_syscall`` returns: they must
    wake nobody on a private word and refuse to wait on it with a stale value (``EAGAIN``)."""
    if system != "Linux":
        return Support(None, f"futex is Linux-only (this is {system})")
    number = SYS_FUTEX.get(machine)
    if number is None:
        return Support(None, f"no futex syscall number known for {machine!r} (known: x86_64, aarch64)")
    try:
        syscall = load_syscall()
    except (OSError, AttributeError) as exc:
        return Support(None, f"libc's syscall() cannot be loaded: {exc}")
    futex = Futex(syscall, number, get_errno)
    word = ctypes.c_uint32(1)
    try:
        woken = futex.wake(ctypes.addressof(word), 1)
        stale = futex.wait(ctypes.addressof(word), 0, 0.0)
    except OSError as exc:
        return Support(None, f"the futex syscall fails here: {exc.strerror}")
    if woken != 0 or stale != "changed":
        return Support(None, f"the futex syscall misbehaves here (woke {woken}, a stale wait {stale})")
    return Support(futex, f"SYS_futex {number} on {machine}")


@functools.cache
def available() -> Support:
    """This process's futex support, probed once."""
    return probe(platform.system(), platform.machine(), _libc_syscall)
