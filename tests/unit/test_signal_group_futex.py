"""The futex calls on a fake ``syscall`` (arguments, every errno outcome, the probe and its fallbacks), then on the
real one: a waiter on a word is woken by a store and a wake, and a wait on an unchanged word times out."""

from __future__ import annotations

import ctypes
import errno
import platform
import threading
import time
from dataclasses import dataclass, field

import pytest

from fastdeploy_patch.signal_group import futex
from fastdeploy_patch.signal_group.futex import FUTEX_WAIT, FUTEX_WAKE, SYS_FUTEX, WAKE_ALL, Futex, Support, probe


def test_syscall_numbers_and_the_shared_operations() -> None:
    assert SYS_FUTEX == {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
    # No FUTEX_PRIVATE_FLAG (128): private futexes never meet across processes.
    assert (FUTEX_WAIT, FUTEX_WAKE, WAKE_ALL) == (0, 1, 2**31 - 1)


@pytest.mark.parametrize(
    ("seconds", "expected"), [(0.0123, (0, 12_300_000)), (1.0, (1, 0)), (1.5, (1, 500_000_000)), (-1, (0, 0))]
)
def test_a_timeout_becomes_a_timespec(seconds: float, expected: tuple[int, int]) -> None:
    limit = futex.timespec(seconds)
    assert (limit.tv_sec, limit.tv_nsec) == expected


@dataclass
class FakeSyscall:
    """libc's ``syscall`` as the futex calls use it: records each call's arguments as Python values and answers
    ``results`` in turn (-1 with ``errnos`` in turn)."""

    results: list[int] = field(default_factory=lambda: [0])
    errnos: list[int] = field(default_factory=list)
    calls: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Answers are popped: copies keep a parametrized list intact for a second run in the same process (mutmut
        # runs every test once to map it, then again).
        self.results = list(self.results)
        self.errnos = list(self.errnos)

    def __call__(self, *args: object) -> int:
        plain = []
        for arg in args:
            if isinstance(arg, (ctypes.c_long, ctypes.c_void_p)):
                plain.append(arg.value)
            elif arg is None:
                plain.append(None)
            else:
                limit = arg._obj  # what ctypes.byref points at
                plain.append((limit.tv_sec, limit.tv_nsec))
        self.calls.append(tuple(plain))
        return self.results.pop(0)

    def get_errno(self) -> int:
        return self.errnos.pop(0)


def _futex(fake: FakeSyscall, number: int = 202) -> Futex:
    return Futex(fake, number, fake.get_errno)


def test_wait_passes_the_address_the_value_seen_and_a_relative_timeout() -> None:
    fake = FakeSyscall([0])
    assert _futex(fake).wait(0x7F00_0000_1004, 41, 0.0125) == "woken"
    assert fake.calls == [(202, 0x7F00_0000_1004, FUTEX_WAIT, 41, (0, 12_500_000), None, 0)]


@pytest.mark.parametrize(
    ("code", "outcome"), [(errno.EAGAIN, "changed"), (errno.EINTR, "interrupted"), (errno.ETIMEDOUT, "timed out")]
)
def test_wait_tells_a_changed_word_a_signal_and_a_timeout_apart(code: int, outcome: str) -> None:
    assert _futex(FakeSyscall([-1], [code])).wait(8, 0, 0.01) == outcome


def test_wait_raises_any_other_error_with_its_errno() -> None:
    with pytest.raises(OSError) as err:
        _futex(FakeSyscall([-1], [errno.EFAULT])).wait(8, 0, 0.01)
    assert err.value.errno == errno.EFAULT and err.value.strerror == "FUTEX_WAIT failed: Bad address"


def test_wake_wakes_everyone_by_default_and_says_how_many() -> None:
    fake = FakeSyscall([2, 0])
    assert _futex(fake, 98).wake(4096) == 2
    assert _futex(fake, 98).wake(4100, 1) == 0
    assert fake.calls == [(98, 4096, FUTEX_WAKE, WAKE_ALL, None, None, 0), (98, 4100, FUTEX_WAKE, 1, None, None, 0)]


def test_wake_raises_its_error() -> None:
    with pytest.raises(OSError) as err:
        _futex(FakeSyscall([-1], [errno.ENOSYS])).wake(8)
    assert err.value.errno == errno.ENOSYS and err.value.strerror == "FUTEX_WAKE failed: Function not implemented"


def test_a_waker_makes_its_arguments_once_and_wakes_like_wake() -> None:
    seen: list[tuple] = []
    fake = FakeSyscall([1, 0, -1], [errno.EPERM])

    def syscall(*args: object) -> int:
        seen.append(args)
        return fake(*args)

    wake = Futex(syscall, 98, fake.get_errno).waker(4104, 3)
    assert fake.calls == []
    assert (wake(), wake()) == (1, 0)
    with pytest.raises(OSError) as err:
        wake()
    assert err.value.errno == errno.EPERM and err.value.strerror == "FUTEX_WAKE failed: Operation not permitted"
    assert fake.calls == [(98, 4104, FUTEX_WAKE, 3, None, None, 0)] * 3
    # The very same argument objects every time: nothing is built between the publishing store and the syscall.
    assert all(a is b for a, b in zip(seen[0], seen[2], strict=True))


# --- the probe ----------------------------------------------------------------------------------------------


def _loader(fake: FakeSyscall):
    return lambda: fake


@pytest.mark.parametrize(("machine", "number"), [("x86_64", 202), ("aarch64", 98), ("arm64", 98)])
def test_the_probe_wakes_nobody_and_sees_a_stale_wait_refused(machine: str, number: int) -> None:
    fake = FakeSyscall([0, -1], [errno.EAGAIN])
    support = probe("Linux", machine, _loader(fake), fake.get_errno)
    assert support.futex == Futex(fake, number, fake.get_errno)
    assert support.reason == f"SYS_futex {number} on {machine}"
    (wake, wait) = fake.calls
    assert wake[0] == number and wake[2:4] == (FUTEX_WAKE, 1)
    # A wait on a word that holds 1, expecting 0, with a zero timeout: EAGAIN at once, never a sleep.
    assert wait[0] == number and wait[2:5] == (FUTEX_WAIT, 0, (0, 0)) and wait[1] == wake[1]


def test_no_futex_off_linux() -> None:
    assert probe("Darwin", "arm64", pytest.fail) == Support(None, "futex is Linux-only (this is Darwin)")


def test_no_futex_on_an_unknown_architecture() -> None:
    assert probe("Linux", "riscv64", pytest.fail) == Support(
        None, "no futex syscall number known for 'riscv64' (known: x86_64, aarch64)"
    )


@pytest.mark.parametrize("failure", [OSError("no libc"), AttributeError("syscall")])
def test_no_futex_when_libc_cannot_be_loaded(failure: Exception) -> None:
    def load() -> None:
        raise failure

    assert probe("Linux", "x86_64", load) == Support(None, f"libc's syscall() cannot be loaded: {failure}")


def test_no_futex_when_the_kernel_refuses_the_call() -> None:
    fake = FakeSyscall([-1], [errno.ENOSYS])
    assert probe("Linux", "x86_64", _loader(fake), fake.get_errno) == Support(
        None, "the futex syscall fails here: FUTEX_WAKE failed: Function not implemented"
    )


@pytest.mark.parametrize(
    ("results", "errnos", "says"),
    [([1, -1], [errno.EAGAIN], "woke 1, a stale wait changed"), ([0, 0], [], "woke 0, a stale wait woken")],
)
def test_no_futex_when_the_call_misbehaves(results: list[int], errnos: list[int], says: str) -> None:
    # Copies: the fake pops what it answers, and the parameters are shared by every run of this test in a process
    # (mutmut runs it once per mutant).
    fake = FakeSyscall(list(results), list(errnos))
    assert probe("Linux", "x86_64", _loader(fake), fake.get_errno) == Support(
        None, f"the futex syscall misbehaves here ({says})"
    )


# --- the real syscall ---------------------------------------------------------------------------------------


def test_futex_works_here_and_is_probed_once() -> None:
    support = futex.available()
    assert support.futex is not None, support.reason
    assert futex.available() is support


def test_a_real_sleeper_is_woken_by_a_store_and_a_wake() -> None:
    real = futex.available().futex
    word = ctypes.c_uint32(7)
    address = ctypes.addressof(word)
    outcomes: list[str] = []

    def sleeper() -> None:
        # Generous slices, re-checked like the transport does: only the store and wake can end this quickly.
        deadline = time.monotonic() + 30
        while word.value == 7 and time.monotonic() < deadline:
            outcomes.append(real.wait(address, 7, 5.0))

    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.05)
    word.value = 8
    real.wake(address)
    thread.join(30)
    assert not thread.is_alive() and word.value == 8
    assert outcomes and outcomes[-1] in ("woken", "changed")


def test_a_real_wait_on_an_unchanged_word_times_out_and_a_stale_one_returns_at_once() -> None:
    real = futex.available().futex
    word = ctypes.c_uint32(3)
    started = time.monotonic()
    assert real.wait(ctypes.addressof(word), 3, 0.01) == "timed out"
    assert time.monotonic() - started >= 0.009
    assert real.wait(ctypes.addressof(word), 4, 5.0) == "changed"


def test_libc_syscall_is_loaded_with_a_long_result_and_its_errno() -> None:
    syscall = futex._libc_syscall()
    assert syscall.restype is ctypes.c_long
    # Loaded afresh (available() is probed once per process): a refused wait must report its own errno.
    word = ctypes.c_uint32(3)
    fresh = Futex(syscall, SYS_FUTEX[platform.machine()], ctypes.get_errno)
    assert fresh.wait(ctypes.addressof(word), 4, 5.0) == "changed"
