"""One world of reusable ranks: ``RankPool`` starts N Paddle ranks that each join the world once, then runs one
module-level function on all of them per call, until a call fails or the pool is retired (``rank_pool`` decides).

The ranks are ``rank_processes``' (started by ``start_rank``, waited for by pidfd, killed by session) and run
``pool_rank``, which talks to this controller through one pipe each. Per call the controller sends the call to
every rank, then waits on every rank's reply pipe and process sentinel together, so a rank that exits is seen at
once, and reads every rank's reply before the next call. Arguments and results cross as pickles (``pickles``). A
rank that raised, died or hung fails the call with ``rank_processes``' errors, and the pool is dead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from subprocess import TimeoutExpired
from tempfile import TemporaryDirectory
from typing import Any

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import pickles, warm_parent
from fastdeploy_patch.testing.call_target import CallTarget
from fastdeploy_patch.testing.rank_entry import PORT_TAKEN_EXIT
from fastdeploy_patch.testing.rank_processes import (
    RANK_PRELUDE,
    START_TIMEOUT_S,
    RankFailed,
    RankProcess,
    RankSpec,
    RankTimeout,
    kill_ranks,
    stacks,
    start_rank,
    wait_any,
)
from fastdeploy_patch.testing.rank_world import DEVICES, free_ports, rank_env

# The prelude goes first, before the import of Paddle (seconds): the rank dies with its test process, and a rank stuck
# anywhere, even in that import or in C++, answers SIGUSR1 with every thread's stack.
POOL_ENTRY = "fastdeploy_patch.testing.pool_rank"
POOL_RANK_BOOTSTRAP = RANK_PRELUDE + f"from {POOL_ENTRY} import main; sys.exit(main(sys.argv[1:]))"

PORT_ATTEMPTS = 3
"""How many times a pool starts on fresh ports when its rank 0 found the master port taken (by another test
process that picked the same free port a moment before)."""

MAX_CALLS_PER_POOL = 200
"""Calls a pool serves before it is replaced. What a call cannot undo stays in its ranks: Paddle cannot remove a
gloo group from its registry, and every group's keys stay in the global TCP store; the limit bounds that."""

MAX_RSS_GROWTH_BYTES = 1 << 30
"""A pool is replaced once one of its ranks has grown this much (resident memory) since it joined the world, so a
test that leaks cannot make the machine swap. A rank here takes about 0.4 GiB after joining; 50 trivial calls
grew it by less than ``tests/distributed/test_rank_pool_reuse.py``'s bound."""

CLOSE_GRACE_S = 5.0
"""How long idle ranks get to leave on their own once the controller hangs up, before they are killed."""

KILL_GRACE_S = 1.0
"""How long ranks that are busy (a failed or interrupted call) get between SIGTERM, on which they save their
coverage data, and SIGKILL: a Ctrl-C must end pytest within seconds."""

_DIED_REAP_S = 1.0
_REASONS = {"raised": "rank raised", "skipped": "rank skipped", "leftovers": "leftovers"}


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``; 0 once it is gone (its exit is seen where its reply is awaited)."""
    return procfs.rss_bytes(pid) or 0


class RankPool:
    """``nranks`` live ranks on ``devices`` (``"cpu"``: gloo; ``"gpu"``: NCCL, rank ``r`` on GPU ``r``), with
    ``env`` over this process's environment and every default of ours, started by ``start()``.

    ``bootstrap`` is the Python code each rank's interpreter runs (``-c``), with its connection's file descriptor as
    its one argument. With ``fork`` and the default bootstrap, the ranks are forks of this process's warm parent
    (``warm_parent``), which imported Paddle once, unless ``warm_parent.fork_refusal`` says why they cannot be
    (``spawn_reason``); they are spawned otherwise. After a failed call the pool is dead: ``kill()`` it and start
    another.
    """

    def __init__(
        self,
        nranks: int,
        env: Mapping[str, str],
        *,
        devices: str = "cpu",
        bootstrap: str = POOL_RANK_BOOTSTRAP,
        fork: bool = True,
    ) -> None:
        self.nranks = nranks
        self.env = dict(env)
        self.devices = devices
        self.bootstrap = bootstrap
        self.fork = fork
        self.spawn_reason: str | None = None
        """Why the ranks were spawned rather than forked (None: they were forked, or not started yet)."""
        self.calls = 0
        self.port_retries = 0
        self.retire_reason: str | None = None
        """Set after a successful call when this pool must not serve another."""
        self.label: tuple[str, int] = ("", 0)
        """The test and its call number the pool serves now: kept logs are named after them."""
        self._ranks: list[RankProcess] = []
        self._conns: dict[int, Connection] = {}
        self._joined_rss: dict[int, int] = {}
        self._workdir: TemporaryDirectory | None = None
        self._sent: bytes | None = None
        self._claims = contextlib.ExitStack()
        """The claims on the ports its ranks were given, held while they live (``rank_world.free_ports``)."""

    def start(self, target: CallTarget, timeout: float = START_TIMEOUT_S) -> None:
        """Start every rank and wait until each joined the world; the call ``target`` is named in errors."""
        self.launch()
        self.wait_joined(target, timeout)

    def launch(self) -> None:
        """Start every rank without waiting for them: ``wait_joined`` does that. Calls sent meanwhile wait in the
        ranks' pipes until they joined. A rank is listed (and so killed with the pool) as soon as it runs."""
        self._workdir = self._workdir or TemporaryDirectory(prefix="fdp-pool-")
        ports = free_ports(self.nranks + 1, self._claims)
        backend = DEVICES[self.devices]
        forked_env = {**os.environ, **warm_parent.PARENT_ENV, **self.env}
        self.spawn_reason = self._spawn_reason(forked_env)
        for rank in range(self.nranks):
            ours, theirs = Pipe()
            # The caller's env goes last: it wins over every default of ours, the world's variables included.
            base = os.environ if self.spawn_reason else forked_env
            env = {**base, **rank_env(rank, self.nranks, ports, backend=backend), **self.env}
            argv = (sys.executable, "-c", self.bootstrap, str(theirs.fileno()))
            log_path = Path(self._workdir.name) / f"rank{rank}.log"
            try:
                method = "spawn" if self.spawn_reason else "fork"
                spec = RankSpec(
                    rank, argv, env, log_path, pass_fds=(theirs.fileno(),), start_method=method, entry=POOL_ENTRY
                )
                process = start_rank(spec)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self._ranks.append(process)
            self._conns[rank] = ours

    def _spawn_reason(self, forked_env: Mapping[str, str]) -> str | None:
        if not self.fork:
            return "fork=False"
        if self.bootstrap != POOL_RANK_BOOTSTRAP:
            return "the ranks run a bootstrap of their own"
        # Without a warm parent yet, compare with the one that would start: what it reads at start comes from this
        # process alone, so that a world whose env= sets such a variable is spawned, not made the reference for every
        # world after it.
        own = {
            name: value for name, value in self.env.items() if not name.startswith(warm_parent.IMPORT_TIME_PREFIXES)
        }
        parent_env = warm_parent.shared_env() or warm_parent.parent_environment({**os.environ, **own})
        return warm_parent.fork_refusal(forked_env, parent_env, devices=self.devices)

    def wait_joined(self, target: CallTarget, timeout: float) -> float:
        """Wait until every launched rank joined the world, and return when the last one did (``time.monotonic()``).
        A world whose rank 0 found its port taken starts again on other ports (``PORT_ATTEMPTS`` in all), with the
        call sent already sent again. Raises like ``call``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                replies = self._collect(target, max(0.0, deadline - time.monotonic()), " while the pool started")
                break
            except RankFailed as exc:
                if exc.returncode != PORT_TAKEN_EXIT or self.port_retries + 1 >= PORT_ATTEMPTS:
                    raise
            self.port_retries += 1
            self.kill()
            self._ranks, self._conns = [], {}
            self.launch()
            if self._sent is not None:
                self._send_all(self._sent)
        self._joined_rss = {r.rank: rss_bytes(r.pid) for r in self._ranks}
        return max(reply["at"] for reply in replies)

    def call(self, target: CallTarget, kwargs: Mapping[str, Any], timeout: float) -> list[Any]:
        """Run ``target(**kwargs)`` on every rank and return the results by rank; raises ``RankFailed`` or
        ``RankTimeout`` (the pool is dead then). Sets ``retire_reason`` when the pool must not be reused."""
        self.send(target, kwargs)
        return self.replies(target, timeout)

    def send(self, target: CallTarget, kwargs: Mapping[str, Any]) -> None:
        """Send the call ``target(**kwargs)`` to every rank; ``replies`` collects what they answer."""
        self._sent = pickles.dumps(
            {
                "module": target.module,
                "qualname": target.qualname,
                "file": target.file,
                "kwargs": dict(kwargs),
                "sys_path": sys.path,
            },
            f"the test process cannot send the call {target} to the ranks",
        )
        self.calls += 1
        for r in self._ranks:
            # A pool's first call owns the log from the start: how the ranks joined belongs to it.
            r.log_start = 0 if self.calls == 1 else r.log_size()
        self._send_all(self._sent)

    def _send_all(self, payload: bytes) -> None:
        for conn in self._conns.values():
            # A rank that died since its last reply shows up as dead when its reply is awaited.
            with contextlib.suppress(OSError):
                conn.send_bytes(payload)

    def replies(self, target: CallTarget, timeout: float) -> list[Any]:
        """Every rank's result of the call sent last, by rank; raises like ``call``."""
        replies = self._collect(target, timeout, "")
        self._sent = None
        left = [f"state left behind: {', '.join(reply['left_behind'])}" for reply in replies if reply["left_behind"]]
        if any(reply["exit_code"] is not None for reply in replies):
            self.retire_reason = "rank exited"
        elif left:
            self.retire_reason = left[0]
        elif self.calls >= MAX_CALLS_PER_POOL:
            self.retire_reason = "call limit"
        elif any(rss_bytes(r.pid) - self._joined_rss[r.rank] > MAX_RSS_GROWTH_BYTES for r in self._ranks):
            self.retire_reason = "memory limit"
        return [pickles.loads(reply["result"]) for reply in replies]

    def pids(self) -> list[int]:
        """The ranks' process ids, by rank."""
        return [r.pid for r in self._ranks]

    def stacks(self) -> dict[int, str]:
        """Every live rank's log tail after it printed its stack there (``rank_processes.stacks``)."""
        return stacks(self._ranks)

    def close(self) -> None:
        """Hang up on every rank, give them ``CLOSE_GRACE_S`` to leave, then kill what is left; idempotent. An
        exception meanwhile (a second Ctrl-C) cuts the grace short, never the kill."""
        try:
            self.hang_up()
            deadline = time.monotonic() + CLOSE_GRACE_S
            for r in self._ranks:
                with contextlib.suppress(TimeoutExpired):
                    r.process.wait(max(0.0, deadline - time.monotonic()))
        finally:
            self.kill()

    def hang_up(self) -> None:
        """Close the connection to every rank: an idle rank leaves on its own (``close()`` waits for that)."""
        for conn in self._conns.values():
            conn.close()

    def kill(
        self, grace: float = KILL_GRACE_S, keep_logs: Callable[[int], Path] | None = None, *, term: bool = True
    ) -> None:
        """Kill every rank's session (SIGTERM, ``grace`` seconds, SIGKILL; SIGKILL at once with ``term=False``) and
        free what the pool holds; idempotent. ``keep_logs``: where each rank's log of the current call is kept
        (``keep_logs(rank)``), once it is dead."""
        try:
            kill_ranks(self._ranks, grace, term=term)
        finally:
            self.hang_up()
            if keep_logs is not None:
                self._keep_logs(keep_logs)
            self._claims.close()
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def _keep_logs(self, path_of: Callable[[int], Path]) -> None:
        for r in self._ranks:
            path = path_of(r.rank)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(r.log_text(r.log_start))
            except OSError as exc:
                # A log that cannot be kept must not hide the failure that is being reported.
                warnings.warn(f"paddle_ranks could not keep rank {r.rank}'s log at {path}: {exc}", stacklevel=2)

    def _collect(self, target: CallTarget, timeout: float, during: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        replies: dict[int, dict[str, Any]] = {}
        while len(replies) < self.nranks:
            pending = [r for r in self._ranks if r.rank not in replies]
            conns = [self._conns[r.rank] for r in pending]
            ready = wait_any(pending, conns, max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankTimeout(
                    ranks=[r.rank for r in pending],
                    nranks=self.nranks,
                    target=str(target),
                    timeout=timeout,
                    reports=self.stacks(),
                    during=during,
                )
            for r in pending:
                if self._conns[r.rank] in ready or r.sentinel in ready:
                    reply = _read(self._conns[r.rank])
                    if reply is None or reply["status"] not in ("ok", "ready"):
                        raise self._failed(r, reply, target, during)
                    replies[r.rank] = reply
        return [replies[rank] for rank in range(self.nranks)]

    def _failed(self, r: RankProcess, reply: dict[str, Any] | None, target: CallTarget, during: str) -> RankFailed:
        returncode = None
        if reply is None:
            with contextlib.suppress(TimeoutExpired):
                returncode = r.process.wait(_DIED_REAP_S)
        return RankFailed(
            rank=r.rank,
            nranks=self.nranks,
            target=str(target),
            returncode=returncode,
            error="" if reply is None else reply["error"],
            reports={other.rank: other.log_tail() for other in self._ranks},
            reason=_death_reason(returncode) if reply is None else _REASONS[reply["status"]],
            during=during,
        )


def _death_reason(returncode: int | None) -> str:
    return "port taken" if returncode == PORT_TAKEN_EXIT else "rank died"


def _read(conn: Connection) -> dict[str, Any] | None:
    """The rank's next message, or ``None`` when it died without sending one."""
    if not conn.poll(0):
        return None
    try:
        return pickles.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return None
