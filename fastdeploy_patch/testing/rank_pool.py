"""Multi-rank calls on reusable ranks: the pools of one test session (``RankPools``), one warm world
(``pool_world.RankPool``) per world size, devices and environment, and the calls started in the background
(``StartedCall``).

Why: a fresh launch costs every rank its ``import paddle`` and ``init_parallel_env()`` (seconds), while most multi-rank
tests run for a fraction of a second. The pytest plugin (``plugin``) is the user-facing side.

The controller (this module, in the test process) never imports Paddle. After each call every rank puts back the
state it joined with (``rank_state``). A rank that raised, died or hung fails the call and the pool is killed (every
rank's stack is taken first on a timeout); the next call starts a fresh pool. A pool is also retired after a call
that asked for a fresh world, after a rank left through ``exit_after_reply``, after a call that left threads or child
processes running, and at a call-count or memory limit (``pool_world``).

Every pool leaves through ``RankPools._retire``, and every call and start runs inside ``RankPools._retiring``: any
exception there, a Ctrl-C included, kills the pool before it goes on, keeps its ranks' logs when asked to, and names
why in the session's summary.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fastdeploy_patch.testing import warm_parent
from fastdeploy_patch.testing.call_target import CallTarget, check_call
from fastdeploy_patch.testing.pool_world import POOL_RANK_BOOTSTRAP, RankPool
from fastdeploy_patch.testing.rank_processes import (
    START_TIMEOUT_S,
    RankFailed,
    RankInterrupted,
    RankTimeout,
)
from fastdeploy_patch.testing.rank_world import check_devices

__all__ = [
    "MAX_LIVE_POOLS",
    "START_TIMEOUT_S",
    "CallTarget",
    "RankCallFailed",
    "RankCallHung",
    "RankCallInterrupted",
    "RankPool",
    "RankPools",
    "StartedCall",
]

RankCallFailed = RankFailed
"""A rank of a pool raised, skipped, left signal groups open, or died before replying (``rank_processes``)."""
RankCallHung = RankTimeout
"""Ranks of a pool did not reply in time (``rank_processes``)."""
RankCallInterrupted = RankInterrupted
"""The test process was interrupted while it waited for a call (``rank_processes``)."""

MAX_LIVE_POOLS = 2
"""Pools kept alive at once by default (one per world size, devices and environment): the suite's tests alternate
between 2 and 4 ranks. Asking for one more key retires the pool used least recently."""


def kept_log_name(worker: str, test: str, call: int, rank: int) -> str:
    """A kept log's file name, ``<worker>__<test>__call<N>__rank<R>.log``: the test's node id with every run of
    characters a file name should not hold replaced by ``_``, cut to its last 150 characters."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", test).strip("_")[-150:]
    return f"{worker}__{slug}__call{call}__rank{rank}.log"


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
        # A fresh world's end is no recycle: only what ended it early (a rank that exited, a thread left) counts.
        reason = self._pool.retire_reason
        self._pools._retire(self._pool, reason, kill=True, saved=reason is None)
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
    """The pools of one test session, one per world size, devices and environment (at most ``max_pools`` alive), the
    calls started in the background, and what they all did: ``starts``, ``calls`` and ``recycles`` (reason ->
    count).

    ``keep_logs``: a directory where every rank's log of each failed call is kept, named by ``kept_log_name`` with
    ``worker`` and the test ``current_test()`` names when the call was made.
    """

    def __init__(
        self,
        *,
        bootstrap: str = POOL_RANK_BOOTSTRAP,
        max_pools: int = MAX_LIVE_POOLS,
        keep_logs: Path | None = None,
        worker: str = "main",
        current_test: Callable[[], str] = lambda: "session",
    ) -> None:
        self.bootstrap = bootstrap
        self.max_pools = max_pools
        self.keep_logs = keep_logs
        self.worker = worker
        self.current_test = current_test
        self.starts = 0
        self.calls = 0
        self.recycles: Counter[str] = Counter()
        self._pools: OrderedDict[tuple, RankPool] = OrderedDict()
        self._started: list[StartedCall] = []
        self._alive: list[RankPool] = []
        """Every pool not retired yet, in use or not: what ``close()`` kills whatever else happened."""
        self._calls_by_test: Counter[str] = Counter()

    def run(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float,
        fresh: bool = False,
        env: Mapping[str, str] | None = None,
        devices: str = "cpu",
    ) -> list[Any]:
        """Run module-level ``fn(**kwargs)`` on ``nranks`` ranks of a pool on ``devices`` (``"cpu"``, or ``"gpu"``:
        rank ``r`` on GPU ``r``, NCCL) whose ranks got ``env``, and return every rank's result by rank. ``fresh``: on
        a world of its own, thrown away afterwards. The ranks of a new pool get ``START_TIMEOUT_S`` to join the world;
        ``timeout`` counts from then.

        Raises ``TypeError``/``ValueError`` for bad arguments before any rank starts, ``RankFailed``,
        ``RankTimeout`` or ``RankInterrupted`` when the call failed; the pool it ran on is dead by then and the next
        call starts another. A ``KeyboardInterrupt`` goes on once the pool is dead.
        """
        target = CallTarget.of(fn)
        kwargs, env = check_call(nranks, kwargs, timeout, env)
        key = (nranks, check_devices(devices), tuple(sorted(env.items())))
        pool = None if fresh else self._pools.pop(key, None)
        label = self._label()
        if pool is None:
            # A fresh world is never kept, so it takes no live pool's place.
            while not fresh and len(self._pools) >= self.max_pools:
                self._retire(self._pools.popitem(last=False)[1], "another world size or environment")
            pool = self._new_pool(nranks, env, devices)
            pool.label = label
            with self._retiring(pool, target):
                pool.start(target)
        pool.label = label
        self.calls += 1
        with self._retiring(pool, target):
            results = pool.call(target, kwargs, timeout)
        if fresh or pool.retire_reason is not None:
            # A fresh world's ranks saved their coverage with their reply: killing them spares the call their exit. Its
            # end is no recycle, unless something else ended it (a rank that exited, a thread left behind).
            self._retire(pool, pool.retire_reason, kill=fresh, saved=fresh and pool.retire_reason is None)
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
        devices: str = "cpu",
    ) -> StartedCall:
        """Start module-level ``fn(**kwargs)`` on a fresh world of ``nranks`` ranks on ``devices`` and return at once,
        without waiting for the ranks to join: ``StartedCall.result()`` collects it. For calls that mostly wait (a
        stuck peer, a long timeout), which other calls can overlap. Argument errors are raised here, as by ``run``."""
        target = CallTarget.of(fn)
        kwargs, env = check_call(nranks, kwargs, timeout, env)
        pool = self._new_pool(nranks, env, check_devices(devices))
        pool.label = self._label()
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
        parent = warm_parent.shared_pid()
        return pooled + [pid for started in self._started for pid in started.pids()] + ([parent] if parent else [])

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
            warm_parent.close_shared()

    def stats(self) -> dict[str, Any]:
        """What the pools did, as JSON: ``starts``, ``calls`` and ``recycles`` (reason -> count)."""
        return {"starts": self.starts, "calls": self.calls, "recycles": dict(self.recycles)}

    def _label(self) -> tuple[str, int]:
        test = self.current_test()
        self._calls_by_test[test] += 1
        return test, self._calls_by_test[test]

    def _new_pool(self, nranks: int, env: dict[str, str], devices: str) -> RankPool:
        pool = RankPool(nranks, env, devices=devices, bootstrap=self.bootstrap)
        self.starts += 1
        self._alive.append(pool)
        return pool

    @contextlib.contextmanager
    def _retiring(self, pool: RankPool, target: CallTarget) -> Iterator[None]:
        """Whatever the block raises retires ``pool``, its ranks killed (and their logs kept, when asked to) before
        the exception goes on, and counts why: a failed call by its reason, an error of the test process's own (a
        failed ``pidfd_open``), and a ``KeyboardInterrupt`` or ``SystemExit`` as they are; pytest's outcomes
        (pytest-timeout's signal method raises one) after every rank's stack was taken, as ``RankInterrupted``."""
        try:
            yield
        except (RankFailed, RankTimeout) as exc:
            self._retire(pool, exc.reason, kill=True, failed=True)
            raise
        except Exception:
            self._retire(pool, "error in the test process", kill=True, failed=True)
            raise
        except (KeyboardInterrupt, SystemExit):
            self._retire(pool, "interrupted", kill=True, failed=True)
            raise
        except BaseException as exc:
            try:
                failure = RankInterrupted(nranks=pool.nranks, target=str(target), cause=exc, reports=pool.stacks())
            finally:
                self._retire(pool, "interrupted", kill=True, failed=True)
            raise failure from exc

    def _retire(
        self, pool: RankPool, reason: str | None, *, kill: bool = False, failed: bool = False, saved: bool = False
    ) -> None:
        """The one way out of a pool: count ``reason`` (``None``: the session's end) and close the pool, or kill it at
        once (``kill``: its ranks may be busy), keeping its logs first when the call ``failed`` and logs are kept.
        ``saved``: its ranks replied to every call, coverage saved with each reply, so SIGKILL alone ends them (a
        SIGTERM would have them write their coverage again, and a SIGKILL in the middle of that would leave a torn
        data file)."""
        if reason is not None:
            self.recycles[reason] += 1
        try:
            if kill:
                pool.kill(keep_logs=self._log_paths(pool) if failed else None, term=not saved)
            else:
                pool.close()
        finally:
            with contextlib.suppress(ValueError):
                self._alive.remove(pool)

    def _log_paths(self, pool: RankPool) -> Callable[[int], Path] | None:
        if self.keep_logs is None:
            return None
        directory, (test, call) = self.keep_logs, pool.label
        return lambda rank: directory / kept_log_name(self.worker, test, call, rank)
