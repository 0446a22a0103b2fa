"""What the ``paddle_ranks`` fixture gives a test: ``PaddleRanks`` (``run``, ``run_expecting_failure``, ``start``) on
the session's reusable Paddle ranks (``rank_pool``), and ``StartedRanks`` for calls started in the background.

The pytest side (options, markers, fixtures, hooks) is the top-level module ``pytest_paddle_ranks``, which pytest
loads through the package's ``pytest11`` entry point whether or not Paddle is installed, and which imports this
module when a test first asks for ``paddle_ranks``. docs/paddle_ranks.md is the user guide. Importing this module
imports no Paddle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from fastdeploy_patch.testing import leak_guard, rank_pool
from fastdeploy_patch.testing.rank_processes import RankError

PADDLE_RANKS_TIMEOUT_S = 90.0
"""A call's default timeout unless the session sets another (``--paddle-ranks-timeout``, ini
``paddle_ranks_timeout``): longer than gloo's fixed 30 s op timeout (a stuck-peer test waits that out) plus the test's
own work, and below our distributed suite's 150 s pytest timeout, so the ranks' stacks are shown first."""


def new_pools(config: Any, settings: Any, current_test: Callable[[], str]) -> rank_pool.RankPools:
    """The session's pools under ``settings`` (``pytest_paddle_ranks.Settings``); kept logs are named after the
    xdist worker of ``config`` and the test ``current_test()`` names."""
    workerinput = getattr(config, "workerinput", None)
    return rank_pool.RankPools(
        max_pools=settings.max_pools,
        keep_logs=settings.keep_logs,
        worker=workerinput["workerid"] if workerinput is not None else "main",
        current_test=current_test,
    )


class PaddleRanks:
    """Calls on the session's pools, with ``env`` (from ``paddle_ranks_env``) added to every rank's environment,
    ``timeout`` as every call's default, and ``reuse()`` as its default choice between a fresh world (False) and a
    warm pool (True)."""

    def __init__(
        self,
        pools: rank_pool.RankPools,
        env: Mapping[str, str],
        *,
        timeout: float = PADDLE_RANKS_TIMEOUT_S,
        reuse: Callable[[], bool] = lambda: False,
    ) -> None:
        self._pools = pools
        self._reuse = reuse
        # The run's tag lets the leak guard tell this session's ranks from everyone else's.
        self._env = {leak_guard.RUN_TAG_VAR: leak_guard.RUN_TAG, **env}
        self.timeout = timeout

    def run(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        reuse: bool | None = None,
        env: Mapping[str, str] | None = None,
        devices: str = "cpu",
    ) -> list[Any]:
        """Run module-level ``fn(**kwargs)`` on ``nranks`` ranks (each already ran ``init_parallel_env()``) and
        return every rank's return value (pickled across), by rank.

        Each call gets a fresh world, thrown away after it: nothing a call changes in its processes reaches another.
        ``reuse=True`` (the default in a test marked ``paddle_ranks_reuse``) runs it on a warm pool instead, which
        puts back after each call only what its restore list names. ``env``: more environment for the ranks, which
        wins over every default of ours (ranks with another environment are another pool). ``devices="gpu"``: rank
        ``r`` uses GPU ``r`` and the world's backend is NCCL. ``timeout``: seconds for the call, the session's
        default (90 s unless set) when ``None``, counted once every rank joined the world. A rank that raises,
        skips, leaves a signal group open or dies, a call past its timeout, and a call interrupted by
        pytest-timeout's signal method, fail the test with every rank's report; the next call runs on a fresh pool.
        """
        try:
            if reuse is not None and not isinstance(reuse, bool):
                raise TypeError(f"reuse must be True, False or None, got {reuse!r}")
            fresh = not (self._reuse() if reuse is None else reuse)
            return self._pools.run(fn, nranks, kwargs=kwargs, fresh=fresh, **self._options(timeout, env, devices))
        except RankError as exc:
            failure = str(exc)
        # Outside the except block: the report is the message alone, not chained to the exception that carried it.
        pytest.fail(failure, pytrace=False)

    def run_expecting_failure(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        devices: str = "cpu",
    ) -> rank_pool.RankCallFailed:
        """Run ``fn`` on a fresh world of ``nranks`` ranks meant to fail; return the report of the first rank seen
        failing (``rank``, ``returncode``: ``None`` when it raised, ``reports``: every rank's log tail). A call in
        which every rank succeeds, or that hangs, fails the test."""
        try:
            self._pools.run(fn, nranks, kwargs=kwargs, fresh=True, **self._options(timeout, env, devices))
        except rank_pool.RankCallFailed as exc:
            return exc
        except rank_pool.RankCallHung as exc:
            failure = str(exc)
        else:
            failure = f"every rank of {nranks} finished {rank_pool.CallTarget.of(fn)}, but they were meant to die"
        pytest.fail(failure, pytrace=False)

    def start(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        devices: str = "cpu",
    ) -> StartedRanks:
        """Start ``fn(**kwargs)`` on a fresh world of ``nranks`` ranks in the background and return at once;
        ``.result()`` on what it returns waits for the ranks' results and fails the test as ``run`` does.

        For calls that mostly wait (a peer kept stuck for half a minute): the session's other calls run meanwhile.
        ``timeout`` counts from the moment every rank joined the world. A started call nobody collects is killed at
        the end of the session.
        """
        return StartedRanks(self._pools.start(fn, nranks, kwargs=kwargs, **self._options(timeout, env, devices)))

    def live_pids(self) -> list[int]:
        """The process ids of the session's live pool ranks and started calls, which outlive a test on purpose."""
        return self._pools.live_pids()

    def _options(self, timeout: float | None, env: Mapping[str, str] | None, devices: str) -> dict[str, Any]:
        """A call's timeout (the default filled in), devices, and its ranks' environment (the session's with ``env``
        on top)."""
        if env is not None and not isinstance(env, Mapping):
            raise TypeError(f"env must map variable names to strings, got {env!r}")
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "env": {**self._env, **(env or {})},
            "devices": devices,
        }


class StartedRanks:
    """A call that ``paddle_ranks.start`` runs in the background: ``result()`` or ``cancel()``, once."""

    def __init__(self, started: rank_pool.StartedCall) -> None:
        self._started = started

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments every rank got."""
        return self._started.kwargs

    def result(self) -> list[Any]:
        """Every rank's return value, by rank, once the call has ended; a rank that failed, or a call past its
        timeout, fails the test with every rank's report, as ``run`` does."""
        try:
            return self._started.result()
        except RankError as exc:
            failure = str(exc)
        pytest.fail(failure, pytrace=False)

    def cancel(self) -> None:
        """Kill the call's ranks without waiting for its result; a no-op once ended."""
        self._started.cancel()
