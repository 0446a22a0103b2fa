"""Multi-rank calls on reusable ranks: a pool keeps N Paddle ranks alive, each of which joined the world once, and
runs one module-level function on all of them per call.

Why: a fresh launch costs every rank its ``import paddle`` and ``init_parallel_env()`` (seconds), while most multi-rank
tests run for a fraction of a second. ``RankPools`` keeps one pool per world size and environment and hands out calls;
the pytest plugin (``plugin``) is its user-facing side.

The controller (this module, in the test process) never imports Paddle. Ranks are started like the launcher's
(``launcher.rank_env``, free ports, a session and a log file each) and run ``pool_rank``. Per call the controller
sends the call to every rank, then waits on every rank's reply pipe and process sentinel (a pidfd) together, so a
rank that exits is seen at once, and reads every rank's reply before the next call. Arguments and results cross as
pickles (``pickles``). After each call every rank puts back the state it joined with (``rank_state``). A rank that
raised, died or hung fails the call and the pool is killed (faulthandler prints every rank's stack first on a
timeout); the next call starts a fresh pool. A pool is also retired after a call that asked for a fresh world, after
a rank left through ``exit_after_reply``, after a call that left threads or child processes running, and at a
call-count or memory limit.

Every pool leaves through ``RankPools._retire``, and every call and start runs inside ``RankPools._retiring``: any
exception there, a Ctrl-C included, kills the pool before it goes on, and names why in the session's summary.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from subprocess import Popen, TimeoutExpired
from tempfile import TemporaryDirectory
from typing import Any

from fastdeploy_patch.testing import launcher, pickles
from fastdeploy_patch.testing.rank_entry import PORT_TAKEN_EXIT

# The launcher's prelude goes first, before the import of Paddle (seconds): the rank dies with its test process, and a
# rank stuck anywhere, even in that import or in C++, answers SIGUSR1 with every thread's stack.
POOL_RANK_BOOTSTRAP = (
    launcher.RANK_PRELUDE + "from fastdeploy_patch.testing.pool_rank import main; sys.exit(main(sys.argv[1:]))"
)

START_TIMEOUT_S = launcher.START_TIMEOUT_S
"""How long a pool's ranks may take to import Paddle and join the world; a call's timeout counts from then."""

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

MAX_LIVE_POOLS = 2
"""Pools kept alive at once (one per world size and environment): the suite's tests alternate between 2 and 4
ranks. Asking for a third key retires the pool used least recently."""

CLOSE_GRACE_S = 5.0
"""How long idle ranks get to leave on their own once the controller hangs up, before they are killed."""

KILL_GRACE_S = 1.0
"""How long ranks that are busy (a failed or interrupted call) get between SIGTERM, on which they save their
coverage data, and SIGKILL: a Ctrl-C must end pytest within seconds."""

_DIED_REAP_S = 1.0


class RankCallFailed(launcher.RankFailed):
    """A rank of a pool raised, skipped, left signal groups open, or died before replying (a rank 0 that found its
    port taken on every attempt: reason "port taken"); the pool is dead.

    ``rank``: that rank; ``returncode``: its exit code, or ``None`` when it replied with an error; ``error``: what
    it replied (its traceback) or ``""``; ``reports``: every rank's log tail; ``reason``: why the pool was recycled.
    """

    def __init__(
        self,
        *,
        rank: int,
        nranks: int,
        target: str,
        returncode: int | None,
        error: str,
        reports: dict[int, str],
        reason: str,
        during: str = "",
    ) -> None:
        self.rank, self.returncode, self.reports, self.error, self.reason = rank, returncode, reports, error, reason
        what = (
            f"it exited before replying, {launcher.exit_description(returncode)}" if returncode is not None else reason
        )
        first = error if returncode is None else reports.get(rank, "")
        others = "".join(
            f"\n----- rank {other} (log tail) -----\n{tail}"
            for other, tail in sorted(reports.items())
            if other != rank
        )
        launcher.RankError.__init__(
            self,
            f"rank {rank} of {nranks} failed in {target}{during}: {what}\n----- rank {rank} -----\n{first}{others}",
        )


class RankCallInterrupted(launcher.RankError):
    """The test process raised ``cause`` while it waited for a call (pytest-timeout's signal method does); ``reports``
    holds every rank's stack. The pool is dead."""

    reason = "interrupted"

    def __init__(
        self, *, nranks: int, target: str, cause: BaseException, reports: dict[int, str], during: str = ""
    ) -> None:
        self.cause, self.reports = cause, reports
        stacks = "".join(f"\n----- rank {rank} -----\n{tail}" for rank, tail in sorted(reports.items()))
        launcher.RankError.__init__(
            self,
            f"{type(cause).__name__}: {cause}, while {nranks} rank(s) ran {target}{during}; their stacks:{stacks}",
        )


class RankCallHung(launcher.RankTimeout):
    """Ranks ``ranks`` did not reply within ``timeout`` seconds; ``reports`` holds every rank's stack (its log tail
    after faulthandler's dump). The pool is dead."""

    reason = "rank hung"

    def __init__(
        self, *, ranks: list[int], nranks: int, target: str, timeout: float, reports: dict[int, str], during: str = ""
    ) -> None:
        self.ranks, self.timeout, self.reports = ranks, timeout, reports
        stacks = "".join(f"\n----- rank {rank} -----\n{tail}" for rank, tail in sorted(reports.items()))
        launcher.RankError.__init__(
            self, f"ranks {ranks} of {nranks} hung in {target}{during} for {timeout:g} s; their stacks:{stacks}"
        )


@dataclass(frozen=True)
class CallTarget:
    """A module-level function as the ranks find it: its module's name, its qualified name, and the file the test
    process loaded that module from (for modules that are not importable by name)."""

    module: str
    qualname: str
    file: str | None

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> CallTarget:
        """The target naming ``fn``; ``TypeError``/``ValueError`` unless the ranks can import ``fn`` by name."""
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
        if not callable(fn) or not isinstance(module, str) or not isinstance(qualname, str):
            raise TypeError(f"fn must be a module-level function, got {fn!r}")
        if "<" in qualname or module == "__main__":
            raise ValueError(
                f"fn must be defined at module level of an importable module (the ranks import it by name), got "
                f"{module}:{qualname}"
            )
        loaded = sys.modules.get(module)
        found: Any = loaded
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is not fn:
            raise ValueError(f"fn is not what {module}:{qualname} names, so the ranks could not import it: {fn!r}")
        return cls(module, qualname, getattr(loaded, "__file__", None))

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"


def check_call(nranks: object, kwargs: object, timeout: object, env: object) -> tuple[dict, dict]:
    """Check a call's arguments before anything starts; returns ``kwargs`` and ``env`` as plain dicts."""
    if isinstance(nranks, bool) or not isinstance(nranks, int) or nranks < 1:
        raise ValueError(f"nranks must be a positive integer, got {nranks!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise TypeError(f"kwargs must be a mapping of argument names to values, got {kwargs!r}")
    for name, value in kwargs.items():
        pickles.dumps(value, f"the test process cannot send kwargs[{name!r}] to the ranks")
    env = {} if env is None else env
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError(f"env must map variable names to strings, got {env!r}")
    return dict(kwargs), dict(env)


@dataclass
class _PoolRank:
    rank: int
    process: Popen
    conn: Connection
    log_path: Path
    pidfd: int = -1
    joined_rss: int = 0

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-launcher.LOG_TAIL_CHARS :]


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux ``/proc``)."""
    resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class RankPool:
    """``nranks`` live ranks sharing ``env`` (added to this process's environment), started by ``start()``.

    ``bootstrap`` is the Python code each rank's interpreter runs (``-c``), with its connection's file descriptor as
    its one argument. After a failed call the pool is dead: ``kill()`` it and start another.
    """

    def __init__(self, nranks: int, env: Mapping[str, str], *, bootstrap: str = POOL_RANK_BOOTSTRAP) -> None:
        self.nranks = nranks
        self.env = dict(env)
        self.bootstrap = bootstrap
        self.calls = 0
        self.port_retries = 0
        self.retire_reason: str | None = None
        """Set after a successful call when this pool must not serve another."""
        self._ranks: list[_PoolRank] = []
        self._workdir: TemporaryDirectory | None = None
        self._sent: bytes | None = None
        self._claims = contextlib.ExitStack()
        """The claims on the ports its ranks were given, held while they live (``launcher.free_ports``)."""

    def start(self, target: CallTarget, timeout: float = START_TIMEOUT_S) -> None:
        """Start every rank and wait until each joined the world; the call ``target`` is named in errors."""
        self.launch()
        self.wait_joined(target, timeout)

    def launch(self) -> None:
        """Start every rank without waiting for them: ``wait_joined`` does that. Calls sent meanwhile wait in the
        ranks' pipes until they joined. A rank is listed (and so killed with the pool) as soon as it runs."""
        self._workdir = self._workdir or TemporaryDirectory(prefix="fdp-pool-")
        ports = launcher.free_ports(self.nranks + 1, self._claims)
        base = {**os.environ, **self.env}
        for rank in range(self.nranks):
            ours, theirs = Pipe()
            log_path = Path(self._workdir.name) / f"rank{rank}.log"
            try:
                process = launcher.start_rank_process(
                    [sys.executable, "-c", self.bootstrap, str(theirs.fileno())],
                    log_path,
                    {**base, **launcher.rank_env(rank, self.nranks, ports)},
                    pass_fds=[theirs.fileno()],
                )
            finally:
                theirs.close()
            self._ranks.append(_PoolRank(rank, process, ours, log_path))
            self._ranks[-1].pidfd = os.pidfd_open(process.pid)

    def wait_joined(self, target: CallTarget, timeout: float) -> float:
        """Wait until every launched rank joined the world, and return when the last one did (``time.monotonic()``).
        A world whose rank 0 found its port taken starts again on other ports (``PORT_ATTEMPTS`` in all), with the
        call sent already sent again. Raises like ``call``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                replies = self._collect(target, max(0.0, deadline - time.monotonic()), " while the pool started")
                break
            except RankCallFailed as exc:
                if exc.returncode != PORT_TAKEN_EXIT or self.port_retries + 1 >= PORT_ATTEMPTS:
                    raise
            self.port_retries += 1
            self.kill()
            self._ranks = []
            self.launch()
            if self._sent is not None:
                self._send_all(self._sent)
        for r in self._ranks:
            r.joined_rss = rss_bytes(r.process.pid)
        return max(reply["at"] for reply in replies)

    def call(self, target: CallTarget, kwargs: Mapping[str, Any], timeout: float) -> list[Any]:
        """Run ``target(**kwargs)`` on every rank and return the results by rank; raises ``RankCallFailed`` or
        ``RankCallHung`` (the pool is dead then). Sets ``retire_reason`` when the pool must not be reused."""
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
        self._send_all(self._sent)

    def _send_all(self, payload: bytes) -> None:
        for r in self._ranks:
            # A rank that died since its last reply shows up as dead when its reply is awaited.
            with contextlib.suppress(OSError):
                r.conn.send_bytes(payload)

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
        elif any(rss_bytes(r.process.pid) - r.joined_rss > MAX_RSS_GROWTH_BYTES for r in self._ranks):
            self.retire_reason = "memory limit"
        return [pickles.loads(reply["result"]) for reply in replies]

    def pids(self) -> list[int]:
        """The ranks' process ids, by rank."""
        return [r.process.pid for r in self._ranks]

    def stacks(self) -> dict[int, str]:
        """Every live rank's log tail after faulthandler printed its stack there (SIGUSR1)."""
        return launcher._tracebacks(self._ranks)

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
        for r in self._ranks:
            r.conn.close()

    def kill(self, grace: float = KILL_GRACE_S) -> None:
        """Kill every rank's session (SIGTERM, ``grace`` seconds, SIGKILL) and free what the pool holds;
        idempotent."""
        try:
            launcher.kill_all(self._ranks, grace)
        finally:
            for r in self._ranks:
                r.conn.close()
                if r.pidfd >= 0:
                    os.close(r.pidfd)
                    r.pidfd = -1
            self._claims.close()
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def _collect(self, target: CallTarget, timeout: float, during: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        replies: dict[int, dict[str, Any]] = {}
        while len(replies) < self.nranks:
            pending = [r for r in self._ranks if r.rank not in replies]
            ready = wait([w for r in pending for w in (r.conn, r.pidfd)], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankCallHung(
                    ranks=[r.rank for r in pending],
                    nranks=self.nranks,
                    target=str(target),
                    timeout=timeout,
                    reports=self.stacks(),
                    during=during,
                )
            for r in pending:
                if r.conn in ready or r.pidfd in ready:
                    reply = _read(r.conn)
                    if reply is None or reply["status"] not in ("ok", "ready"):
                        raise self._failed(r, reply, target, during)
                    replies[r.rank] = reply
        return [replies[rank] for rank in range(self.nranks)]

    def _failed(self, r: _PoolRank, reply: dict[str, Any] | None, target: CallTarget, during: str) -> RankCallFailed:
        returncode = None
        if reply is None:
            with contextlib.suppress(TimeoutExpired):
                returncode = r.process.wait(_DIED_REAP_S)
        reports = {other.rank: other.log_tail() for other in self._ranks}
        return RankCallFailed(
            rank=r.rank,
            nranks=self.nranks,
            target=str(target),
            returncode=returncode,
            error="" if reply is None else reply["error"],
            reports=reports,
            reason=_death_reason(returncode) if reply is None else _REASONS[reply["status"]],
            during=during,
        )


_REASONS = {"raised": "rank raised", "skipped": "rank skipped", "leftovers": "leftovers"}


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


class StartedCall:
    """A call that ``RankPools.start`` runs in the background, on a world of its own, while the session's pools
    serve other calls. ``result()`` waits for it and ``cancel()`` kills its ranks; either one retires its world."""

    def __init__(
        self, pools: RankPools, pool: RankPool, target: CallTarget, kwargs: dict[str, Any], timeout: float
    ) -> None:
        self.target, self.kwargs, self.timeout = target, kwargs, timeout
        self._pools, self._pool = pools, pool
        self._start_deadline = time.monotonic() + START_TIMEOUT_S
        self.ended = False
        """Whether ``result()`` or ``cancel()`` was called."""

    def pids(self) -> list[int]:
        """The process ids of the call's ranks, by rank."""
        return self._pool.pids()

    def result(self) -> list[Any]:
        """Every rank's result, by rank, once the call has ended. The ranks get ``START_TIMEOUT_S`` from ``start()``
        to join the world, and the call's ``timeout`` counts from the moment the last one did. Raises
        ``RankCallFailed``, ``RankCallHung`` or ``RankCallInterrupted`` like ``RankPools.run``, and ``RuntimeError``
        when the call was already collected or cancelled."""
        self._end_once()
        with self._pools._retiring(self._pool, self.target):
            ready_at = self._pool.wait_joined(self.target, max(0.0, self._start_deadline - time.monotonic()))
            results = self._pool.replies(self.target, max(0.0, ready_at + self.timeout - time.monotonic()))
        self._pools._retire(self._pool, self._pool.retire_reason or "fresh world")
        return results

    def cancel(self, reason: str = "cancelled") -> None:
        """Kill the call's ranks without waiting for its result (a no-op once ended); ``reason`` is the recycle
        reason the session's summary counts."""
        if not self.ended:
            self._end_once()
            # Killed: closing would give ranks still busy with the call a grace period to leave.
            self._pools._retire(self._pool, reason, kill=True)

    def _end_once(self) -> None:
        if self.ended:
            raise RuntimeError(f"the started call {self.target} was already collected or cancelled")
        self.ended = True
        self._pools._started.remove(self)


class RankPools:
    """The pools of one test session, one per world size and environment (at most ``MAX_LIVE_POOLS`` alive), the
    calls started in the background, and what they all did: ``starts``, ``calls`` and ``recycles`` (reason ->
    count)."""

    def __init__(self, *, bootstrap: str = POOL_RANK_BOOTSTRAP) -> None:
        self.bootstrap = bootstrap
        self.starts = 0
        self.calls = 0
        self.recycles: Counter[str] = Counter()
        self._pools: OrderedDict[tuple, RankPool] = OrderedDict()
        self._started: list[StartedCall] = []
        self._alive: list[RankPool] = []
        """Every pool not retired yet, in use or not: what ``close()`` kills whatever else happened."""

    def run(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float,
        fresh: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """Run module-level ``fn(**kwargs)`` on ``nranks`` ranks of a pool whose ranks got ``env``, and return every
        rank's result by rank. ``fresh``: on a world of its own, thrown away afterwards. The ranks of a new pool get
        ``START_TIMEOUT_S`` to join the world; ``timeout`` counts from then.

        Raises ``TypeError``/``ValueError`` for bad arguments before any rank starts, ``RankCallFailed``,
        ``RankCallHung`` or ``RankCallInterrupted`` when the call failed; the pool it ran on is dead by then and the
        next call starts another. A ``KeyboardInterrupt`` goes on once the pool is dead.
        """
        target = CallTarget.of(fn)
        kwargs, env = check_call(nranks, kwargs, timeout, env)
        key = (nranks, tuple(sorted(env.items())))
        pool = None if fresh else self._pools.pop(key, None)
        if pool is None:
            # A fresh world is never kept, so it takes no live pool's place.
            while not fresh and len(self._pools) >= MAX_LIVE_POOLS:
                self._retire(self._pools.popitem(last=False)[1], "another world size or environment")
            pool = self._new_pool(nranks, env)
            with self._retiring(pool, target):
                pool.start(target)
        self.calls += 1
        with self._retiring(pool, target):
            results = pool.call(target, kwargs, timeout)
        if fresh or pool.retire_reason is not None:
            self._retire(pool, pool.retire_reason or "fresh world")
        else:
            self._pools[key] = pool
        return results

    def start(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> StartedCall:
        """Start module-level ``fn(**kwargs)`` on a fresh world of ``nranks`` ranks and return at once, without
        waiting for the ranks to join: ``StartedCall.result()`` collects it. For calls that mostly wait (a stuck
        peer, a long timeout), which other calls can overlap. Argument errors are raised here, as by ``run``."""
        target = CallTarget.of(fn)
        kwargs, env = check_call(nranks, kwargs, timeout, env)
        pool = self._new_pool(nranks, env)
        self.calls += 1
        with self._retiring(pool, target):
            pool.launch()
            pool.send(target, kwargs)
        started = StartedCall(self, pool, target, kwargs, timeout)
        self._started.append(started)
        return started

    def live_pids(self) -> list[int]:
        """The process ids of every live pool rank and of every started call not yet ended (they outlive the test
        that started them, on purpose)."""
        pooled = [pid for pool in self._pools.values() for pid in pool.pids()]
        return pooled + [pid for started in self._started for pid in started.pids()]

    def close(self) -> None:
        """Close every pool and cancel every started call nobody collected (at the end of the session);
        idempotent. Whatever interrupts that, every pool's ranks are killed before it goes on."""
        try:
            # Idle ranks leave side by side (a Paddle rank takes a while to exit) while the busy ones are killed.
            for pool in self._pools.values():
                pool.hang_up()
            while self._started:
                self._started[0].cancel("never collected")
            while self._pools:
                self._retire(self._pools.popitem()[1], None)
        finally:
            while self._alive:
                self._alive.pop().kill()

    def stats(self) -> dict[str, Any]:
        """What the pools did, as JSON: ``starts``, ``calls`` and ``recycles`` (reason -> count)."""
        return {"starts": self.starts, "calls": self.calls, "recycles": dict(self.recycles)}

    def add_stats(self, stats: Mapping[str, Any]) -> None:
        """Count what another process's pools did (``stats()`` there) as if these pools had done it: pytest-xdist's
        workers each run pools of their own, and the controller sums them up for the session's summary."""
        self.starts += stats["starts"]
        self.calls += stats["calls"]
        self.recycles.update(stats["recycles"])

    def summary(self) -> str:
        """One line: pool starts, calls served, recycles and why."""
        why = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.recycles.items()))
        recycles = sum(self.recycles.values())
        return (
            f"paddle_ranks: {self.starts} pool start{'s' * (self.starts != 1)}, {self.calls} "
            f"call{'s' * (self.calls != 1)} served, {recycles} recycle{'s' * (recycles != 1)}"
            + (f" ({why})" if why else "")
        )

    def _new_pool(self, nranks: int, env: dict[str, str]) -> RankPool:
        pool = RankPool(nranks, env, bootstrap=self.bootstrap)
        self.starts += 1
        self._alive.append(pool)
        return pool

    @contextlib.contextmanager
    def _retiring(self, pool: RankPool, target: CallTarget) -> Iterator[None]:
        """Whatever the block raises retires ``pool``, its ranks killed before the exception goes on, and counts
        why: a failed call by its reason, an error of the test process's own (a failed ``pidfd_open``), and a
        ``KeyboardInterrupt`` or ``SystemExit`` as they are; pytest's outcomes (pytest-timeout's signal method raises
        one) after every rank's stack was taken, as ``RankCallInterrupted``."""
        try:
            yield
        except (RankCallFailed, RankCallHung) as exc:
            self._retire(pool, exc.reason, kill=True)
            raise
        except Exception:
            self._retire(pool, "error in the test process", kill=True)
            raise
        except (KeyboardInterrupt, SystemExit):
            self._retire(pool, "interrupted", kill=True)
            raise
        except BaseException as exc:
            try:
                failure = RankCallInterrupted(nranks=pool.nranks, target=str(target), cause=exc, reports=pool.stacks())
            finally:
                self._retire(pool, "interrupted", kill=True)
            raise failure from exc

    def _retire(self, pool: RankPool, reason: str | None, *, kill: bool = False) -> None:
        """The one way out of a pool: count ``reason`` (``None``: the session's end) and close the pool, or kill it at
        once (``kill``: its ranks may be busy)."""
        if reason is not None:
            self.recycles[reason] += 1
        try:
            if kill:
                pool.kill()
            else:
                pool.close()
        finally:
            with contextlib.suppress(ValueError):
                self._alive.remove(pool)
