"""One way to run rank processes: start one (``start_rank``), wait for several, take their stacks, kill them, and say
how a run of them failed (``RankFailed``, ``RankTimeout``, ``RankInterrupted``: one format).

The launcher (``launcher.run_ranks``) and the rank pool (``pool_world``) are both uses of this module: they decide
what each rank runs and how it replies; this module owns the processes.

``start_rank`` is the one place a rank process is made. Its input, ``RankSpec``, says all a start method needs: the
rank, the command (any placement prefix such as ``nsenter``, the interpreter, its arguments), the exact environment,
the working directory, the log file, the file descriptors the rank inherits, and the start method's name.
``START_METHODS`` maps that name to the function that makes the process: ``"spawn"`` (``subprocess.Popen`` of the
command) and ``"fork"`` (``warm_parent``: the spec's entry module in a fork of a parent that imported Paddle once,
an object with ``Popen``'s ``pid``, ``returncode``, ``poll()``, ``wait(timeout)`` and ``send_signal(sig)``); either
leads a session of its own, its output in the spec's log file. Whatever made the process,
``start_rank`` returns a ``RankProcess`` with a pidfd that becomes readable when it exits, and everything after
(waiting, stacks, killing, reports) is the same.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from fastdeploy_patch import procfs

LOG_TAIL_CHARS = 4000
"""How much of each rank's log a failure report shows (``--paddle-ranks-keep-logs`` keeps whole logs)."""
PARENT_VAR = "FDP_RANK_PARENT"
"""The pid of the process that started a rank, in the rank's environment: the rank leaves at once if it is gone (a
rank started by hand, without it, skips that check)."""

RANK_PRELUDE = (
    "import ctypes, faulthandler, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
    f"os.getppid() == int(os.environ.get('{PARENT_VAR}', os.getppid())) or os._exit(1); "
    "faulthandler.enable(all_threads=True); faulthandler.register(signal.SIGUSR1, all_threads=True); "
)
"""The first statements of every rank's interpreter, before it imports the package (and so Paddle, which takes
seconds). ``PR_SET_PDEATHSIG`` (``prctl(1, SIGKILL)``) kills the rank when the test process dies without running
any cleanup (SIGKILL, ``os._exit``: pytest-timeout's thread method); its parent may have died before that was
set, hence the check of ``getppid()`` (a placement's command prefix must exec the interpreter, not fork it).
Then a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) writes every thread's Python stack to stderr, which
goes to the rank's log, and SIGUSR1 (``stacks``) does the same without killing the rank, so even a rank stuck in an
import shows where. ``import paddle`` replaces the fatal-signal handlers with its own, which print no Python stack:
``rank_entry.reclaim_signal_handlers`` puts faulthandler's back once Paddle is in."""

KILL_GRACE_S = 3.0
"""How long a rank gets between SIGTERM (on which it saves its coverage data) and SIGKILL, unless the caller says."""
SESSION_POLL_S = 0.01
"""How often a kill looks for what is left in the ranks' sessions while the grace lasts."""
START_TIMEOUT_S = 180.0
"""How long ranks may take to import Paddle and join the world, before a call's own timeout starts counting. About
6-7 s per rank here when the machine is idle; several suites running Paddle ranks at once on 2 cores stretch that
several times over."""
STACK_WAIT_S = 1.0
"""How long ranks get to write their stacks to their logs after SIGUSR1."""


@dataclass(frozen=True)
class RankSpec:
    """Everything needed to start one rank process.

    ``argv``: the whole command (a placement's prefix, the interpreter, its arguments); ``env``: exactly the rank's
    environment (``start_rank`` adds only ``PYTHONUNBUFFERED`` and ``PARENT_VAR``); ``log_path``: where its stdout
    and stderr go; ``cwd``: its working directory (``None``: ours); ``pass_fds``: descriptors it inherits;
    ``start_method``: a key of ``START_METHODS``; ``entry``: the module whose ``main`` the command's bootstrap runs
    with the arguments after it (``argv[3:]``), which the ``"fork"`` method runs in a fork of a warm parent instead.
    """

    rank: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    cwd: str | None = None
    pass_fds: tuple[int, ...] = ()
    start_method: str = "spawn"
    entry: str | None = None


@dataclass
class RankProcess:
    """A started rank: its ``process`` (``pid``, ``returncode``, ``poll()``, ``wait(timeout)``, ``send_signal(sig)``,
    as ``subprocess.Popen`` has them), its log, and its pidfd (``sentinel``)."""

    rank: int
    process: Any
    log_path: Path
    sentinel: int = -1
    log_start: int = 0
    """Where the current call's output starts in the log (a pool rank serves many calls)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self, start: int = 0) -> str:
        """The log from byte ``start`` on (empty when there is none yet), undecodable bytes replaced."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        """The last ``LOG_TAIL_CHARS`` characters of the log."""
        return self.log_text()[-LOG_TAIL_CHARS:]

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        """Release the pidfd (the process must have been waited for); idempotent."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def spawn(spec: RankSpec, env: Mapping[str, str]) -> subprocess.Popen:
    """The ``"spawn"`` start method: run ``spec.argv`` with exactly ``env``, in a session of its own, its output in
    ``spec.log_path``."""
    with open(spec.log_path, "wb") as log:
        return subprocess.Popen(
            list(spec.argv),
            env=dict(env),
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A session of its own: killing the rank reaches anything it started, and Ctrl-C reaches only us.
            start_new_session=True,
            pass_fds=tuple(spec.pass_fds),
        )


def fork(spec: RankSpec, env: Mapping[str, str]) -> Any:
    """The ``"fork"`` start method: ``spec.entry`` in a fork of this process's warm parent (``warm_parent``)."""
    # Imported here: the warm parent starts itself through this module.
    from fastdeploy_patch.testing import warm_parent

    return warm_parent.fork_rank(spec, env)


START_METHODS: dict[str, Callable[[RankSpec, Mapping[str, str]], Any]] = {"spawn": spawn, "fork": fork}
"""How a rank process can be made, by name: each takes the spec and the environment to give the process."""


def start_rank(spec: RankSpec) -> RankProcess:
    """Start the rank ``spec`` describes with its start method: exactly its environment (plus unbuffered output and
    ``PARENT_VAR``), its output in its log file, in a session of its own, keeping its ``pass_fds`` open; returns
    once it runs. ``ValueError`` for an unknown start method, before anything starts."""
    method = START_METHODS.get(spec.start_method)
    if method is None:
        raise ValueError(f"start_method must be one of {sorted(START_METHODS)}, got {spec.start_method!r}")
    process = method(spec, {**spec.env, "PYTHONUNBUFFERED": "1", PARENT_VAR: str(os.getpid())})
    started = RankProcess(spec.rank, process, spec.log_path)
    try:
        started.sentinel = os.pidfd_open(process.pid)
    except ProcessLookupError:
        if process.poll() is None:
            kill_ranks([started], 0.0)
            raise
        # A forked rank can end and be reaped by its parent before it is watched here (one that fails at once): its
        # sentinel is a pipe with no writer, ready at once, as its pidfd would have been.
        ready, writer = os.pipe()
        os.close(writer)
        started.sentinel = ready
    except BaseException:
        kill_ranks([started], 0.0)
        raise
    return started


def wait_any(ranks: Sequence[RankProcess], others: Sequence[Any] = (), timeout: float | None = None) -> list[Any]:
    """Wait until a rank exits or one of ``others`` (connections, file descriptors) is readable, at most
    ``timeout`` seconds; returns what is ready (pidfds of exited ranks and ready ``others``)."""
    return wait([r.sentinel for r in ranks if r.sentinel >= 0] + list(others), timeout)


def stacks(ranks: Sequence[RankProcess]) -> dict[int, str]:
    """Every live rank's log tail after it wrote every thread's stack there (SIGUSR1, ``RANK_PRELUDE``)."""
    alive = [r for r in ranks if r.process.poll() is None]
    for r in alive:
        with contextlib.suppress(ProcessLookupError):
            r.process.send_signal(signal.SIGUSR1)
    if alive:
        time.sleep(STACK_WAIT_S)
    return {r.rank: r.log_tail() for r in alive}


def kill_ranks(ranks: Sequence[RankProcess], grace: float | None = None, *, term: bool = True) -> None:
    """Kill every rank's session (each rank leads one): SIGTERM, ``grace`` seconds (``KILL_GRACE_S`` by default) for
    the ranks and what they started to leave, then SIGKILL, and reap the ranks; with ``term=False``, SIGKILL at once
    (ranks with nothing left to save). An exception meanwhile (a second Ctrl-C) cuts the grace short, never the
    SIGKILL."""
    try:
        if term:
            for r in ranks:
                _signal_session(r.process, signal.SIGTERM)
            deadline = time.monotonic() + (KILL_GRACE_S if grace is None else grace)
            for r in ranks:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.process.wait(max(0.0, deadline - time.monotonic()))
            _wait_sessions_empty(ranks, deadline)
    finally:
        for r in ranks:
            # Also reaches grandchildren (Paddle's helper processes) that outlive the rank itself.
            _signal_session(r.process, signal.SIGKILL)
        for r in ranks:
            r.process.wait()
            r.close()


def _wait_sessions_empty(ranks: Sequence[RankProcess], deadline: float) -> None:
    # What a rank started and that ignores SIGTERM gets the rest of the grace to leave on its own once the rank is
    # gone: multiprocessing's resource tracker is one, and it removes the shared-memory name that a creator killed
    # inside its handshake still had registered. A SIGKILL to the session at once would take it down first.
    sessions = {r.process.pid for r in ranks}
    while time.monotonic() < deadline:
        stats = (procfs.stat(pid) for pid in procfs.pids())
        if not any(s is not None and s.session in sessions and s.state != "Z" for s in stats):
            return
        time.sleep(SESSION_POLL_S)


def _signal_session(process: Any, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def exit_description(returncode: int) -> str:
    """Say how a process ended: ``"exit code 1"``, or for one killed by a signal ``"exit code -11 (SIGSEGV)"``."""
    if returncode < 0:
        try:
            return f"exit code {returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"exit code {returncode} (signal {-returncode})"
    return f"exit code {returncode}"


def _sections(reports: Mapping[int, str], first: int | None = None, first_text: str = "") -> str:
    """The one layout of ranks' reports: ``----- rank R -----`` then its text; with ``first``, that rank leads with
    ``first_text`` and the others are marked as log tails."""
    if first is None:
        return "".join(f"\n----- rank {rank} -----\n{text}" for rank, text in sorted(reports.items()))
    others = "".join(
        f"\n----- rank {rank} (log tail) -----\n{text}" for rank, text in sorted(reports.items()) if rank != first
    )
    return f"\n----- rank {first} -----\n{first_text}{others}"


class RankError(RuntimeError):
    """A multi-rank run that did not succeed; ``reports`` holds what each rank's log says, ``reason`` why (the rank
    pool counts recycles by it). Every rank of the run is dead by the time it reaches the caller."""

    reason = "failed"
    reports: dict[int, str]


class RankFailed(RankError):
    """Rank ``rank`` of ``nranks`` failed in ``target``: it replied with an ``error`` (``returncode`` ``None``), or
    it exited first (``returncode``: its exit code). ``reports``: every rank's log tail; ``reason``: why, in a few
    words ("rank raised", "rank died", "port taken", ...); ``during``: when (``" while the ranks started"``)."""

    def __init__(
        self,
        *,
        rank: int,
        nranks: int,
        target: str,
        returncode: int | None,
        reports: Mapping[int, str],
        error: str = "",
        reason: str = "rank died",
        during: str = "",
    ) -> None:
        self.rank, self.nranks, self.target, self.returncode = rank, nranks, target, returncode
        self.reports, self.error, self.reason, self.during = dict(reports), error, reason, during
        if returncode is None:
            what, first = reason, error
        else:
            what, first = f"it exited before replying, {exit_description(returncode)}", self.reports.get(rank, "")
        super().__init__(
            f"rank {rank} of {nranks} failed in {target}{during}: {what}" + _sections(self.reports, rank, first)
        )


class RankTimeout(RankError, TimeoutError):
    """Ranks ``ranks`` of ``nranks`` did not finish ``target`` within ``timeout`` seconds (``during``: when);
    ``reports`` holds every live rank's stack (its log tail after the SIGUSR1 dump)."""

    reason = "rank hung"

    def __init__(
        self,
        *,
        ranks: Sequence[int],
        nranks: int,
        target: str,
        timeout: float,
        reports: Mapping[int, str],
        during: str = "",
    ) -> None:
        self.ranks, self.nranks, self.target, self.timeout = list(ranks), nranks, target, timeout
        self.reports, self.during = dict(reports), during
        super().__init__(
            f"ranks {self.ranks} of {nranks} hung in {target}{during} for {timeout:g} s; their stacks:"
            + _sections(self.reports)
        )


class RankInterrupted(RankError):
    """The test process raised ``cause`` while ``nranks`` ranks ran ``target`` (pytest-timeout's signal method does);
    ``reports`` holds every rank's stack."""

    reason = "interrupted"

    def __init__(
        self, *, nranks: int, target: str, cause: BaseException, reports: Mapping[int, str], during: str = ""
    ) -> None:
        self.nranks, self.target, self.cause, self.reports, self.during = nranks, target, cause, dict(reports), during
        super().__init__(
            f"{type(cause).__name__}: {cause}, while {nranks} rank(s) ran {target}{during}; their stacks:"
            + _sections(self.reports)
        )
