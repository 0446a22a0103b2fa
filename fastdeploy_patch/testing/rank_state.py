"""What a call may change in a pool rank's process, and how each call gets the rank back as it was when it joined.

``Baseline.take()`` records, once the rank joined the world, what a call can change and a rank can cheaply and exactly
put back: the environment, the working directory, ``sys.path``, the warnings filters, the SIGINT, SIGTERM and
SIGUSR1 handlers, the ``random``, numpy and Paddle random states, and Paddle's default dtype, dynamic or static mode,
current device and the flags a call set with ``paddle.set_flags``. ``restore()`` puts them back after every call.
What cannot be put back, threads and child processes a call left running, ``left_behind()`` names, and the rank
pool retires the ranks after that call. Importing this module imports neither Paddle nor numpy.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from typing import Any

from fastdeploy_patch import procfs

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
THREAD_END_WAIT_S = 0.5
"""How long the threads a call started get, all together, to end once it returned: a group's closing thread ends
moments after ``close()`` asked it to."""


@dataclass
class _FlagRecorder:
    """Wraps ``paddle.set_flags``: the first value each flag had before a call set it."""

    original: Callable[[dict[str, Any]], None]
    get_flags: Callable[[list[str]], dict[str, Any]]
    before: dict[str, Any] = field(default_factory=dict)

    def __call__(self, flags: dict[str, Any]) -> None:
        unseen = [name for name in flags if name not in self.before]
        if unseen:
            self.before.update(self.get_flags(unseen))
        self.original(flags)

    def restore(self) -> None:
        if self.before:
            self.original(self.before)
            self.before = {}


@dataclass
class _PaddleState:
    dtype: str
    dynamic: bool
    device: str
    rng: list[Any]
    flags: _FlagRecorder

    @classmethod
    def take(cls, paddle: Any) -> _PaddleState:
        recorder = paddle.set_flags
        if not isinstance(recorder, _FlagRecorder):
            recorder = _FlagRecorder(paddle.set_flags, paddle.get_flags)
            paddle.set_flags = recorder
        return cls(
            paddle.get_default_dtype(),
            paddle.in_dynamic_mode(),
            paddle.device.get_device(),
            paddle.get_rng_state(),
            recorder,
        )

    def restore(self, paddle: Any) -> None:
        if paddle.in_dynamic_mode() != self.dynamic:
            (paddle.disable_static if self.dynamic else paddle.enable_static)()
        if paddle.get_default_dtype() != self.dtype:
            paddle.set_default_dtype(self.dtype)
        if paddle.device.get_device() != self.device:
            paddle.device.set_device(self.device)
        paddle.set_rng_state(self.rng)
        self.flags.restore()


@dataclass
class Baseline:
    """The rank's state as a fresh rank has it; ``restore()`` returns the process to it."""

    env: dict[str, str]
    cwd: str
    path: list[str]
    filters: list[Any]
    handlers: dict[int, Any]
    random_state: Any
    numpy_state: Any
    paddle: _PaddleState | None

    @classmethod
    def take(cls) -> Baseline:
        """Record the process's state now (Paddle's and numpy's only when they are imported)."""
        numpy = sys.modules.get("numpy")
        paddle = sys.modules.get("paddle")
        return cls(
            env=dict(os.environ),
            cwd=os.getcwd(),
            path=list(sys.path),
            filters=list(warnings.filters),
            handlers={signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS},
            random_state=random.getstate(),
            numpy_state=None if numpy is None else numpy.random.get_state(),
            paddle=None if paddle is None else _PaddleState.take(paddle),
        )

    def restore(self) -> None:
        """Put back everything ``take`` recorded."""
        if dict(os.environ) != self.env:
            for name in set(os.environ) - set(self.env):
                del os.environ[name]
            os.environ.update(self.env)
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        if sys.path != self.path:
            sys.path[:] = self.path
        # Emptied through the public call that also forgets every module's __warningregistry__: a warning the call
        # saw is shown again to the next one, as in a fresh rank.
        warnings.resetwarnings()
        warnings.filters[:] = self.filters
        warnings.onceregistry.clear()
        self._restore_handlers()
        random.setstate(self.random_state)
        if self.numpy_state is not None:
            sys.modules["numpy"].random.set_state(self.numpy_state)
        if self.paddle is not None:
            self.paddle.restore(sys.modules["paddle"])

    def _restore_handlers(self) -> None:
        for signum, handler in self.handlers.items():
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
                if signum == signal.SIGUSR1:
                    # faulthandler's stack dump on SIGUSR1 sits below Python's handlers: registered again.
                    faulthandler.unregister(signum)
                    faulthandler.register(signum, all_threads=True)


@dataclass(frozen=True)
class Running:
    """The threads and child processes alive before a call (``now()``), to tell what the call left running."""

    threads: frozenset[threading.Thread]
    children: frozenset[int]

    @classmethod
    def now(cls) -> Running:
        return cls(frozenset(threading.enumerate()), frozenset(children()))

    def left_behind(self, *, threads: bool = True) -> list[str]:
        """What the call left running, as ``["2 threads", "1 child process"]``; empty when nothing. ``threads``:
        whether threads count (not for a call that kept signal groups open on purpose: a gloo group runs one).

        Threads the call started get ``THREAD_END_WAIT_S`` in all to end. The ``multiprocessing`` resource tracker
        (which a shared-memory segment starts once per process) is not counted.
        """
        threads = [t for t in threading.enumerate() if t not in self.threads] if threads else []
        for thread in threads:
            thread.join(THREAD_END_WAIT_S / len(threads))
        alive = sum(thread.is_alive() for thread in threads)
        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        started = len(children() - self.children - {tracker})
        return [f"{n} {what}{'s' * (n != 1)}" for n, what in ((alive, "thread"), (started, "child process")) if n]


def children() -> set[int]:
    """The process ids of this process's children that still run (zombies left out)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return set()  # none at all: the common case, answered without reading /proc
    # A child that exited meanwhile is gone from the listing or reads as a zombie: neither runs any more.
    return {pid for pid in procfs.children("self") or [] if (now := procfs.stat(pid)) and now.state != "Z"}
