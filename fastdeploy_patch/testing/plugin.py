"""The ``paddle_ranks`` pytest plugin: multi-rank tests on a session's reusable Paddle ranks (``rank_pool``).

Registered through the package's ``pytest11`` entry point, so installing ``fastdeploy-patch[cpu,test]`` is all a
project needs. The fixtures are ``paddle_ranks`` (``run``, ``run_expecting_failure``) and ``paddle_ranks_env``; the
README's "Testing your own multi-rank code" is their user guide. pytest imports this module before any coverage
measurement starts, so it imports nothing heavy at module level (and never Paddle): the pool is created when the
first test asks for it. Under pytest-xdist every worker keeps pools of its own, and the controller's summary line
adds up what all of them did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from fastdeploy_patch.testing import rank_pool

PADDLE_RANKS_TIMEOUT_S = 90.0
"""A call's default timeout: longer than gloo's fixed 30 s op timeout (a stuck-peer test waits that out) plus the
test's own work, and below the distributed suite's 150 s pytest timeout, so the ranks' stacks are shown first."""

_POOLS = pytest.StashKey[rank_pool.RankPools]()
_WORKER_STATS = "paddle_ranks"
"""The key of an xdist worker's pool statistics in its ``workeroutput``."""


class PaddleRanks:
    """What the ``paddle_ranks`` fixture gives a test: calls on the session's pools, with ``env`` (from
    ``paddle_ranks_env``) added to every rank's environment."""

    def __init__(self, pools: rank_pool.RankPools, env: Mapping[str, str]) -> None:
        self._pools = pools
        self._env = dict(env)

    def run(
        self,
        fn: Callable[..., Any],
        nranks: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        fresh: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """Run module-level ``fn(**kwargs)`` on ``nranks`` ranks (each already ran ``init_parallel_env()``) and
        return every rank's return value (pickled across), by rank.

        ``fresh``: on a world of its own, thrown away after the call. ``env``: more environment for the ranks (ranks
        with another environment are another pool). ``timeout``: seconds for the call, ``PADDLE_RANKS_TIMEOUT_S`` by
        default, counted once every rank joined the world. A rank that raises, skips, leaves a signal group open or
        dies, a call past its timeout, and a call interrupted by pytest-timeout's signal method, fail the test with
        every rank's report; the next call runs on a fresh pool.
        """
        try:
            return self._run(fn, nranks, kwargs, timeout, fresh, env)
        except rank_pool.launcher.RankError as exc:
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
    ) -> rank_pool.RankCallFailed:
        """Run ``fn`` on a fresh world of ``nranks`` ranks meant to fail; return the report of the first rank seen
        failing (``rank``, ``returncode``: ``None`` when it raised, ``reports``: every rank's log tail). A call in
        which every rank succeeds, or that hangs, fails the test."""
        try:
            self._run(fn, nranks, kwargs, timeout, True, env)
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
    ) -> StartedRanks:
        """Start ``fn(**kwargs)`` on a fresh world of ``nranks`` ranks in the background and return at once;
        ``.result()`` on what it returns waits for the ranks' results and fails the test as ``run`` does.

        For calls that mostly wait (a peer kept stuck for half a minute): the session's other calls run meanwhile.
        ``timeout`` counts from the moment every rank joined the world. A started call nobody collects is killed at
        the end of the session.
        """
        return StartedRanks(self._pools.start(fn, nranks, kwargs=kwargs, **self._options(timeout, env)))

    def live_pids(self) -> list[int]:
        """The process ids of the session's live pool ranks and started calls, which outlive a test on purpose."""
        return self._pools.live_pids()

    def _run(
        self,
        fn: Callable[..., Any],
        nranks: int,
        kwargs: Mapping[str, Any] | None,
        timeout: float | None,
        fresh: bool,
        env: Mapping[str, str] | None,
    ) -> list[Any]:
        return self._pools.run(fn, nranks, kwargs=kwargs, fresh=fresh, **self._options(timeout, env))

    def _options(self, timeout: float | None, env: Mapping[str, str] | None) -> dict[str, Any]:
        """A call's timeout (the default filled in) and its ranks' environment (the session's with ``env`` on top)."""
        if env is not None and not isinstance(env, Mapping):
            raise TypeError(f"env must map variable names to strings, got {env!r}")
        return {"timeout": PADDLE_RANKS_TIMEOUT_S if timeout is None else timeout, "env": {**self._env, **(env or {})}}


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
        except rank_pool.launcher.RankError as exc:
            failure = str(exc)
        pytest.fail(failure, pytrace=False)

    def cancel(self) -> None:
        """Kill the call's ranks without waiting for its result; a no-op once ended."""
        self._started.cancel()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_POOLS] = rank_pool.RankPools()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # An xdist worker sends its workeroutput once every sessionfinish hook ran, and unconfigures only after that: its
    # pools close here, so that what closing them counts (calls nobody collected) reaches the controller's summary.
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        pools = session.config.stash[_POOLS]
        pools.close()
        workeroutput[_WORKER_STATS] = pools.stats()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist's controller, as each worker finishes: add what the worker's pools did to the session's summary."""
    stats = getattr(node, "workeroutput", {}).get(_WORKER_STATS)
    if stats is not None:
        node.config.stash[_POOLS].add_stats(stats)


def pytest_unconfigure(config: pytest.Config) -> None:
    # pytest unconfigures every plugin even when a configure hook raised before ours ran: a KeyError here would
    # replace that error with one about our stash.
    pools = config.stash.get(_POOLS, None)
    if pools is not None:
        pools.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    pools = config.stash[_POOLS]
    if pools.starts:
        terminalreporter.write_line(pools.summary())


@pytest.fixture(scope="session")
def paddle_ranks_env() -> dict[str, str]:
    """Extra environment for every pool rank of the session; override it in a conftest (default: none)."""
    return {}


@pytest.fixture(scope="session")
def paddle_ranks(request: pytest.FixtureRequest, paddle_ranks_env: Mapping[str, str]) -> PaddleRanks:
    """Multi-rank calls on the session's reusable ranks: ``paddle_ranks.run(fn, nranks, ...)``. Session-scoped, so
    fixtures of any scope can use it."""
    return PaddleRanks(request.config.stash[_POOLS], paddle_ranks_env)
