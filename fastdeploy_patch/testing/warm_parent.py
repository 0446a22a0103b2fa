"""Fresh ranks forked from a warm parent: one process per test process imports Paddle once, and every rank of a
fresh world is a fork of it, so no rank pays that import (1.1-1.7 s of CPU here) again.

Why a parent of its own, not the test process: a process that forks must hold one thread, no store and no CUDA.
The test process holds pytest's threads and the ranks' pipes; a rank that joined its world holds gloo's and the
store's threads. The warm parent is started like any rank (``rank_processes.RANK_PRELUDE``: it dies with its test
process, and shows its stack on SIGUSR1), imports Paddle and the rank entry points with BLAS on one thread, and then
only forks: it checks ``Threads: 1`` in its ``/proc/self/status`` before every fork and refuses to fork otherwise.
This module is the test process's side; ``fork_server`` is what runs in the parent.

A forked rank is the warm parent's child, not the test process's. What a spawned rank gets from being a child of
the test process, a forked one gets through the parent:

- dying with its test process: the rank's ``PR_SET_PDEATHSIG`` fires when the warm parent dies, whose own fires
  when the test process dies;
- its exit code and death signal: the parent reaps it and sends ``{"exited": pid, "code": N}`` (``N`` as
  ``subprocess.Popen.returncode`` gives it) to the controller, where ``ForkedProcess`` behaves as a ``Popen`` would;
- killing it and what it started: it leads a session of its own, as a spawned rank does;
- coverage: a forked process keeps measuring and, at its normal exit, saves its own data file.

What does not carry over, and so where ranks are spawned instead (``fork_refusal``): environment variables that
Paddle, BLAS or the interpreter read when they start (``IMPORT_TIME_PREFIXES``) were fixed when the parent started,
so a world whose environment changes one of them is spawned; so is a world with a command in front of its
interpreter (``RankPlacement.command_prefix``), a Paddle built with CUDA (CUDA must not be initialised before a
fork), and any platform without ``fork``. ``/proc/PID/environ`` of a forked rank shows the parent's start-time
environment; ``os.environ`` in the rank is the world's.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdeploy_patch.testing.fork_server import ENTRIES, MESSAGE_BYTES
from fastdeploy_patch.testing.rank_processes import LOG_TAIL_CHARS, RANK_PRELUDE, RankSpec, start_rank
from fastdeploy_patch.testing.rank_world import WORLD_VARS

IMPORT_TIME_PREFIXES = ("FLAGS_", "OMP_", "OPENBLAS_", "MKL_", "KMP_", "GOTO", "CUDA_", "NVIDIA_", "PYTHON", "LD_")
"""Environment variables read when Paddle, its BLAS or the interpreter start, by prefix: a world that sets one of
them otherwise than its warm parent started with is spawned, since a forked rank would not see it."""

PARENT_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
"""What the warm parent's environment holds beside the test process's: numpy's OpenBLAS starts a thread per core
at import unless told otherwise, and a process with threads must not fork; a CPU world never touches a GPU; and, as
every rank process ``rank_processes.start_rank`` makes, unbuffered output (forgetting it here made the parent differ
from every world in a test process without it, so that every world was spawned)."""

BOOTSTRAP = RANK_PRELUDE + "from fastdeploy_patch.testing.fork_server import serve; sys.exit(serve(sys.argv[1:]))"
"""What the warm parent's interpreter runs (``python -c BOOTSTRAP FD``, ``FD`` its socket to the test process): the
launcher's prelude first, so that it dies with the test process and shows its stack on SIGUSR1."""

READY_TIMEOUT_S = 180.0
"""How long the parent may take to import Paddle: as long as a spawned rank's start may take."""

CLOSE_GRACE_S = 5.0
"""How long a parent hung up on gets to leave before it is killed."""


def fork_refusal(
    env: Mapping[str, str],
    parent_env: Mapping[str, str],
    *,
    command_prefix: Sequence[str] = (),
    devices: str = "cpu",
) -> str | None:
    """Why a rank with environment ``env`` cannot be forked from a warm parent that started with ``parent_env``, or
    None when it can: a variable read when Paddle, its BLAS or the interpreter start (``IMPORT_TIME_PREFIXES``) that
    differs between the two, a command in front of the interpreter, GPU devices, a GPU build of Paddle (told from its
    installed distribution, without importing it), or a platform without ``fork``."""
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return f"this platform ({sys.platform}) cannot fork a warm parent"
    if command_prefix:
        return f"the rank's interpreter starts through {' '.join(command_prefix)!r}"
    if devices != "cpu":
        return f"devices={devices!r}: CUDA must not be initialised in a process that forks"
    if gpu_build():
        return "Paddle is a GPU build: CUDA must not be initialised in a process that forks"
    changed = sorted(
        name
        for name in {*env, *parent_env}
        if name.startswith(IMPORT_TIME_PREFIXES) and env.get(name) != parent_env.get(name)
    )
    if changed:
        return f"the environment sets {', '.join(changed)} otherwise than the warm parent, which read them at start"
    return None


def gpu_build() -> bool:
    """Whether the installed Paddle is a GPU wheel (``paddlepaddle-gpu``), told without importing it."""
    try:
        importlib.metadata.distribution("paddlepaddle-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def parent_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a warm parent starts with: ``base`` (a rank's) without the variables that name one rank of one
    world (``rank_world.WORLD_VARS``), with ``PARENT_ENV`` added."""
    return {**{name: value for name, value in base.items() if name not in WORLD_VARS}, **PARENT_ENV}


class ForkedProcess:
    """A rank forked by a ``WarmParent``, used as a ``subprocess.Popen``: ``pid``, ``returncode``, ``poll()``,
    ``wait(timeout)`` and ``send_signal``. Its exit code comes from the parent that reaped it."""

    def __init__(self, parent: WarmParent, pid: int) -> None:
        self._parent = parent
        self.pid = pid
        self.returncode: int | None = None
        self.args = ("forked", pid)

    def poll(self) -> int | None:
        """The exit code once the rank has ended, else None; never waits."""
        if self.returncode is None:
            self._parent.pump(0.0)
            self.returncode = self._parent.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the rank to end and return its exit code; ``subprocess.TimeoutExpired`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._parent.pump(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the rank unless it has ended."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmParent:
    """A process of this test process's that imported Paddle once and forks ranks on request.

    ``start`` launches it (``start_process`` is how: the one way ranks start) and waits until it is ready;
    ``fork`` makes a rank; ``close`` ends it, and with it every rank it forked that still runs.
    """

    def __init__(
        self, process: Any, sock: socket.socket, env: Mapping[str, str], entries: Sequence[str] = ENTRIES
    ) -> None:
        self.process = process
        self.entries = tuple(entries)
        self.env = dict(env)
        """The environment the parent started with: what a forked rank's imports saw."""
        self._sock = sock
        self._exits: dict[int, int] = {}
        self._replies: list[dict[str, Any]] = []
        self._gone = False
        self.threads_at_fork: list[int] = []
        """``Threads:`` in the parent's ``/proc/self/status`` at each fork it made, in order."""

    def gone(self) -> bool:
        """Whether the parent hung up or exited: it forks no more."""
        return self._gone or self.process.poll() is not None

    @classmethod
    def start(
        cls,
        log_path: Path,
        env: Mapping[str, str],
        *,
        bootstrap: str = BOOTSTRAP,
        entries: Sequence[str] = ENTRIES,
        timeout: float = READY_TIMEOUT_S,
    ) -> WarmParent:
        """Start a warm parent (``python -c bootstrap FD``, through ``rank_processes.start_rank``) with
        environment ``parent_environment(env)``, its output in ``log_path``, and wait until it has imported Paddle
        and ``entries``. Raises ``RuntimeError`` with its log when it exits or is not ready within ``timeout``
        seconds (it is killed then)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = (sys.executable, "-c", bootstrap, str(theirs.fileno()))
        try:
            started = start_rank(RankSpec(-1, argv, parent_environment(env), log_path, pass_fds=(theirs.fileno(),)))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # Its pidfd is of no use: the parent is waited for through its socket and its Popen.
        started.close()
        process = started.process
        parent = cls(process, ours, parent_environment(env), entries)
        try:
            ready = parent._expect("ready", timeout, log_path)
        except BaseException:
            parent.close()
            raise
        if ready["pid"] != process.pid:
            parent.close()
            raise RuntimeError(f"process {ready['pid']} answered the warm parent {process.pid} was to be")
        return parent

    def fork(
        self,
        entry: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        pass_fds: Sequence[int] = (),
        cwd: str | None = None,
    ) -> ForkedProcess:
        """Fork a rank that runs ``entry``'s ``main(argv)`` (a module of ``ENTRIES``) with environment ``env``,
        its output in ``log_path``, in a session of its own, in ``cwd`` (this process's working directory by
        default). Each argument
        that is the number of a descriptor in ``pass_fds`` is that descriptor's number in the rank. Returns a
        ``ForkedProcess``; raises ``RuntimeError`` when the parent refuses (it held more than one thread) or is
        gone."""
        if entry not in self.entries:
            raise ValueError(f"entry must be one of {self.entries}, got {entry!r}")
        request = {
            "entry": entry,
            "argv": list(argv),
            "fds": [str(fd) for fd in pass_fds],
            "env": dict(env),
            "log": str(log_path),
            "cwd": cwd or os.getcwd(),
        }
        try:
            socket.send_fds(self._sock, [pickle.dumps(request)], list(pass_fds))
        except OSError as exc:
            raise RuntimeError(f"the warm parent (pid {self.process.pid}) is gone: {exc}") from None
        reply = self._expect("forked", READY_TIMEOUT_S, None)
        self.threads_at_fork.append(reply["threads"])
        return ForkedProcess(self, reply["pid"])

    def exit_code(self, pid: int) -> int | None:
        """The exit code the parent reported for its rank ``pid``; a rank still unreported once the parent is gone
        died with it (``-SIGKILL``, its death signal) as soon as it no longer runs."""
        if pid in self._exits:
            return self._exits[pid]
        if self._gone and not _running(pid):
            self._exits[pid] = -signal.SIGKILL
            return self._exits[pid]
        return None

    def pump(self, timeout: float | None) -> None:
        """Read what the parent sent, waiting at most ``timeout`` seconds (None: until something comes) for the
        first message; exit reports are kept for ``exit_code``, replies for ``fork``."""
        if self._gone:
            if timeout:
                time.sleep(min(timeout, 0.01))
            return
        ready, _, _ = select.select([self._sock], [], [], timeout)
        while ready:
            raw = self._sock.recv(MESSAGE_BYTES)
            if not raw:
                self._gone = True
                return
            message = pickle.loads(raw)
            if message["kind"] == "exited":
                self._exits[message["pid"]] = message["code"]
            else:
                self._replies.append(message)
            ready, _, _ = select.select([self._sock], [], [], 0)

    def close(self) -> None:
        """Hang up: the parent leaves, and ranks it forked that still run die with it. Idempotent."""
        self._sock.close()
        self._gone = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(CLOSE_GRACE_S)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _expect(self, kind: str, timeout: float, log_path: Path | None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._replies:
            left = deadline - time.monotonic()
            if self._gone or left <= 0 or self.process.poll() is not None:
                # A parent that hung up is on its way out, and its own exit code says more than our kill would.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(1.0 if self._gone else 0.0)
                # A parent that cannot answer is of no use: it goes, and with it any rank it forked.
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
                log = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log_path else ""
                raise RuntimeError(
                    f"the warm parent (pid {self.process.pid}) sent no {kind!r} within {timeout:g} s or exited"
                    f" (exit code {self.process.returncode})" + (f":\n{log}" if log else "")
                )
            self.pump(min(left, 0.5))
        reply = self._replies.pop(0)
        if reply["kind"] != kind:
            raise RuntimeError(f"the warm parent refused: {reply.get('error', reply)}")
        return reply


_SHARED: list[tuple[WarmParent, str]] = []
"""This process's warm parent and the directory of its log, once started."""


def shared(env: Mapping[str, str], log_dir: str | None = None) -> WarmParent:
    """This process's warm parent: the one started before while it still answers, else a new one started with
    ``parent_environment(env)``, its log in a new directory under ``log_dir`` (the system's temporary directory by
    default)."""
    if _SHARED and not _SHARED[0][0].gone():
        return _SHARED[0][0]
    close_shared()
    directory = tempfile.mkdtemp(prefix="fdp-warm-parent-", dir=log_dir)
    try:
        parent = WarmParent.start(Path(directory) / "parent.log", env, bootstrap=BOOTSTRAP, entries=ENTRIES)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    _SHARED.append((parent, directory))
    return parent


def shared_env() -> dict[str, str] | None:
    """The environment this process's warm parent started with, or None when it has none that answers."""
    return _SHARED[0][0].env if _SHARED and not _SHARED[0][0].gone() else None


def shared_pid() -> int | None:
    """The process id of this process's warm parent, or None when it has none."""
    return _SHARED[0][0].process.pid if _SHARED else None


def close_shared() -> None:
    """End this process's warm parent, if any, with the ranks it forked that still run, and remove its log."""
    while _SHARED:
        parent, directory = _SHARED.pop()
        try:
            parent.close()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def fork_rank(spec: RankSpec, env: Mapping[str, str]) -> ForkedProcess:
    """The ``"fork"`` start method of ``rank_processes``: ``spec.entry``'s ``main`` with the command's arguments after
    its bootstrap (``spec.argv[3:]``), in a fork of this process's warm parent (``shared``), with exactly ``env``."""
    if spec.entry is None:
        raise ValueError(f"rank {spec.rank} names no entry module, which a forked rank runs instead of its command")
    return shared(env).fork(spec.entry, spec.argv[3:], env, spec.log_path, spec.pass_fds, cwd=spec.cwd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
