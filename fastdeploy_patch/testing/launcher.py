"""Start N real Paddle ranks as subprocesses, collect their results, and never leave one behind.

Every rank runs ``module:function(**kwargs)`` after ``paddle.distributed.init_parallel_env()``. The parent polls
them, kills them all as soon as one fails, and on timeout collects each rank's Python traceback before
killing it. Ranks are plain subprocesses (not ``spawn``/``launch``) so that a survivor's own error is seen.
By default every rank runs here on loopback; a ``RankPlacement`` per rank puts ranks elsewhere (another address,
a command such as ``nsenter`` in front, extra environment), which is how tests simulate several hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdeploy_patch.testing.rank_entry import READY_SUFFIX

LOG_TAIL_CHARS = 4000

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
set, hence the check of ``getppid()`` (a ``RankPlacement.command_prefix`` must exec the interpreter, not fork it).
Then a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) writes every thread's Python stack to stderr, which
the launcher sends to the rank's log, and SIGUSR1 (the timeout's) does the same without killing the rank, so even a
rank stuck in an import shows where. ``import paddle`` replaces the fatal-signal handlers with its own, which
print no Python stack: ``rank_entry.reclaim_signal_handlers`` puts faulthandler's back once Paddle is in."""

RANK_BOOTSTRAP = RANK_PRELUDE + "from fastdeploy_patch.testing.rank_entry import main; sys.exit(main(sys.argv[1:]))"
"""What each rank's interpreter runs (``python -c RANK_BOOTSTRAP SPEC_PATH RESULT_PATH``)."""
KILL_GRACE_S = 3.0
"""How long a rank gets between SIGTERM (on which it saves its coverage data) and SIGKILL."""
START_TIMEOUT_S = 180.0
"""How long ranks may take to import Paddle and join the world, before a call's own timeout starts counting. About
6-7 s per rank here when the machine is idle; several suites running Paddle ranks at once on 2 cores stretch that
several times over."""
_TRACEBACK_WAIT_S = 1.0


class RankError(RuntimeError):
    """Base class for a multi-rank run that did not succeed."""


class RankFailed(RankError):
    """A rank exited non-zero; ``rank`` is the first one seen failing, ``reports`` has every rank's log tail."""

    def __init__(self, rank: int, returncode: int, reports: dict[int, str]) -> None:
        self.rank = rank
        self.returncode = returncode
        self.reports = reports
        super().__init__(
            f"rank {rank} failed with {exit_description(returncode)}:\n{reports[rank]}" + _others(rank, reports)
        )


class RankTimeout(RankError, TimeoutError):
    """The ranks did not all finish in time; ``reports`` has each unfinished rank's traceback and log tail;
    ``during`` says when (``" while the ranks started"``, or ``""`` once every rank was ready)."""

    def __init__(self, timeout: float, reports: dict[int, str], during: str = "") -> None:
        self.timeout = timeout
        self.reports = reports
        self.during = during
        body = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(reports.items()))
        super().__init__(f"ranks {sorted(reports)} did not finish within {timeout:g} s{during}; their stacks:\n{body}")


def exit_description(returncode: int) -> str:
    """Say how a process ended: ``"exit code 1"``, or for one killed by a signal ``"exit code -11 (SIGSEGV)"``."""
    if returncode < 0:
        try:
            return f"exit code {returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"exit code {returncode} (signal {-returncode})"
    return f"exit code {returncode}"


def _others(rank: int, reports: dict[int, str]) -> str:
    rest = [f"--- rank {other} ---\n{text}" for other, text in sorted(reports.items()) if other != rank]
    return ("\nother ranks:\n" + "\n".join(rest)) if rest else ""


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RankPlacement:
    """Where and how one rank runs: its endpoint's address, a command its interpreter is started through (for
    example ``nsenter`` into another host's namespaces; it must exec the interpreter, not fork it, so that killing
    the rank reaches it), and environment variables for it alone."""

    host: str = LOOPBACK
    command_prefix: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Rank:
    rank: int
    process: subprocess.Popen
    log_path: Path
    result_path: Path

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-LOG_TAIL_CHARS:]

    def ready(self) -> bool:
        """Whether the rank joined the world and imported its target (or already finished)."""
        return self.result_path.with_name(self.result_path.name + READY_SUFFIX).exists() or self.result_path.exists()


PORT_CLAIM_PREFIX = "fdp-port-"
"""Abstract Unix socket names (``\\0fdp-port-<port>``) through which test processes claim the ports they hand
their ranks."""


def free_ports(count: int, claims: contextlib.ExitStack, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that were free a moment ago, each claimed for as long as ``claims`` stays
    open: the claim is an abstract Unix socket named after the port, which every process choosing ports here tries
    to bind first, so test processes side by side (xdist workers, a CLI a test started) never hand their ranks the
    same port, however the kernel hands ports out. A claim ends with its process, however that dies, and leaves no
    file behind."""
    ports: list[int] = []
    with contextlib.ExitStack() as probes:
        while len(ports) < count:
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            # Held until every port is chosen: the kernel hands out another port each time.
            probe.bind((host, 0))
            port = probe.getsockname()[1]
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                claim.bind(f"\0{PORT_CLAIM_PREFIX}{port}")
            except OSError:
                claim.close()  # another test process's ranks have this port
                continue
            claims.enter_context(claim)
            ports.append(port)
    return ports


def rank_env(
    rank: int, nranks: int, ports: list[int], *, backend: str = "gloo", hosts: Sequence[str] | None = None
) -> dict:
    """The environment variables Paddle reads to join rank ``rank`` of ``nranks``: rank ``r`` listens on
    ``hosts[r]:ports[r]`` (every host is loopback by default) and the master on ``hosts[0]:ports[nranks]``."""
    hosts = hosts or [LOOPBACK] * nranks
    endpoints = [f"{host}:{port}" for host, port in zip(hosts, ports[:nranks], strict=True)]
    env = {
        "PADDLE_TRAINER_ID": str(rank),
        "PADDLE_TRAINERS_NUM": str(nranks),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
        "PADDLE_MASTER": f"{hosts[0]}:{ports[nranks]}",
        "PADDLE_DISTRI_BACKEND": backend,
        "PADDLE_RANK_IN_NODE": str(rank),
    }
    if backend == "nccl":
        env["FLAGS_selected_gpus"] = str(rank)
    else:
        # A CPU run must not touch a GPU even on a machine that has one.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_ranks(
    target: str,
    nranks: int,
    *,
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: Mapping[str, str] | None = None,
    placements: Sequence[RankPlacement] | None = None,
    poll_interval: float = 0.05,
    start_timeout: float = START_TIMEOUT_S,
) -> list[Any]:
    """Run ``target`` (``"package.module:function"``) in ``nranks`` fresh processes and return each rank's
    JSON-serialisable return value, indexed by rank.

    ``env`` is added to every rank's environment; ``placements``, one per rank, says where each rank runs (by
    default all on loopback, here).

    Raises ``RankFailed`` as soon as one rank exits non-zero, and ``RankTimeout`` when the ranks are not all ready
    (joined, target imported) within ``start_timeout`` seconds or did not all finish ``timeout`` seconds after
    that; in every case, and on ``KeyboardInterrupt``, every rank and its children are killed first. A rank whose
    test process dies without cleanup dies with it (``RANK_PRELUDE``).
    """
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    if isinstance(nranks, bool) or not isinstance(nranks, int) or nranks < 1:
        raise ValueError(f"nranks must be a positive integer, got {nranks!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    placements = list(placements) if placements is not None else [RankPlacement()] * nranks
    if len(placements) != nranks:
        raise ValueError(f"placements must hold one RankPlacement per rank ({nranks}), got {len(placements)}")
    with tempfile.TemporaryDirectory(prefix="fdp-ranks-") as tmp, contextlib.ExitStack() as claims:
        workdir = Path(tmp)
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps({"target": target, "kwargs": dict(kwargs or {})}))
        ports = free_ports(nranks + 1, claims)
        ranks: list[_Rank] = []
        try:
            for rank in range(nranks):
                ranks.append(_start(rank, ports, workdir, spec_path, backend, env, placements))
            _wait(ranks, timeout, poll_interval, start_timeout)
            return [json.loads(r.result_path.read_text()) for r in ranks]
        finally:
            kill_all(ranks)


def _start(
    rank: int,
    ports: list[int],
    workdir: Path,
    spec_path: Path,
    backend: str,
    env: Mapping[str, str] | None,
    placements: list[RankPlacement],
) -> _Rank:
    log_path = workdir / f"rank{rank}.log"
    result_path = workdir / f"rank{rank}.json"
    placement = placements[rank]
    hosts = [p.host for p in placements]
    child_env = {
        **os.environ,
        **(env or {}),
        **placement.env,
        **rank_env(rank, len(placements), ports, backend=backend, hosts=hosts),
    }
    command = [*placement.command_prefix, sys.executable, "-c", RANK_BOOTSTRAP, str(spec_path), str(result_path)]
    return _Rank(rank, start_rank_process(command, log_path, child_env), log_path, result_path)


def start_rank_process(
    command: Sequence[str], log_path: Path, env: Mapping[str, str], pass_fds: Sequence[int] = ()
) -> subprocess.Popen:
    """Start one rank's ``command`` with exactly ``env`` (plus unbuffered output), its output in ``log_path``, in a
    session of its own (so that ``os.killpg`` on its pid reaches everything it starts), keeping ``pass_fds`` open."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(command),
            env={**env, "PYTHONUNBUFFERED": "1", PARENT_VAR: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A session of its own: killing the rank reaches anything it started, and Ctrl-C reaches only us.
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )


def _wait(ranks: list[_Rank], timeout: float, poll_interval: float, start_timeout: float) -> None:
    deadline, ready = time.monotonic() + start_timeout, False
    while True:
        pending = False
        for r in ranks:
            code = r.process.poll()
            if code is None:
                pending = True
            elif code != 0:
                kill_all(ranks)
                raise RankFailed(r.rank, code, {o.rank: o.log_tail() for o in ranks})
        if not pending:
            return
        if not ready and all(r.ready() for r in ranks):
            deadline, ready = time.monotonic() + timeout, True
        if time.monotonic() >= deadline:
            raise RankTimeout(
                timeout if ready else start_timeout, _tracebacks(ranks), "" if ready else " while the ranks started"
            )
        time.sleep(poll_interval)


def _tracebacks(ranks: list[_Rank]) -> dict[int, str]:
    alive = [r for r in ranks if r.process.poll() is None]
    for r in alive:
        # RANK_BOOTSTRAP registers faulthandler on SIGUSR1: each rank prints every thread's stack to its log.
        with contextlib.suppress(ProcessLookupError):
            r.process.send_signal(signal.SIGUSR1)
    time.sleep(_TRACEBACK_WAIT_S)
    return {r.rank: r.log_tail() for r in alive}


def kill_all(ranks: Sequence[Any], grace: float | None = None) -> None:
    """Kill every rank's session (each rank's ``process`` leads one): SIGTERM, ``grace`` seconds (``KILL_GRACE_S``
    by default) to leave, then SIGKILL. An exception meanwhile (a second Ctrl-C) cuts the grace short, never the
    SIGKILL."""
    try:
        for r in ranks:
            _signal_session(r.process, signal.SIGTERM)
        deadline = time.monotonic() + (KILL_GRACE_S if grace is None else grace)
        for r in ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.process.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for r in ranks:
            # Also reaches grandchildren (Paddle's helper processes) that outlive the rank itself.
            _signal_session(r.process, signal.SIGKILL)
        for r in ranks:
            r.process.wait()


def _signal_session(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
