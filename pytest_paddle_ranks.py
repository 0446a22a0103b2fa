"""The ``paddle_ranks`` pytest plugin: real multi-rank Paddle tests on reusable ranks (docs/paddle_ranks.md).

pytest loads this module through the ``pytest11`` entry point in every project that installs ``fastdeploy-patch``.
It is a top-level module, outside ``fastdeploy_patch``, because that package's root raises ``ImportError`` without
Paddle (its documented contract): from here pytest runs as usual where Paddle is missing, and only a test that asks
for ``paddle_ranks`` errors, naming what to install. Everything that needs the package (the pools, the leak guard) is
imported when first used; this module imports neither Paddle nor the package, so that coverage, which starts after
pytest loaded its plugins, measures all of it.

What it adds: the ``paddle_ranks``, ``paddle_ranks_env``, ``paddle_ranks_leak_guard``,
``paddle_ranks_segment_prefixes`` and ``started_early`` fixtures; the ``paddle_gpus(n)`` and ``started_early``
markers; the ``--paddle-ranks-*`` options and their ini twins; and one summary line per session.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEFAULT_TIMEOUT_S = 90.0
"""A call's default timeout: longer than gloo's fixed 30 s op timeout (a stuck-peer test waits that out) plus the
test's own work, and below the 150 s pytest timeout our distributed suite uses, so the ranks' stacks are shown
first."""
DEFAULT_MAX_POOLS = 2
"""Warm pools a test process keeps (one per world size, devices and environment): about 0.4 GiB a CPU rank, so
2 pools of 4 ranks cost about 3 GiB per xdist worker."""

INSTALL_HINT = (
    "the paddle_ranks fixture needs fastdeploy-patch with Paddle: pip install 'fastdeploy-patch[cpu,test]' (CPU), "
    "or Paddle 3.3's GPU wheel from Paddle's own index (docs/paddle_ranks.md, 'Install')"
)
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
_DEV = Path("/dev")


@dataclass
class Settings:
    """The session's ``paddle_ranks`` settings, from the command line first, then the ini file, then defaults."""

    timeout: float = DEFAULT_TIMEOUT_S
    keep_logs: Path | None = None
    max_pools: int = DEFAULT_MAX_POOLS
    check_leaks: bool = False


@dataclass
class _Session:
    settings: Settings
    pools: Any = None
    """The session's ``RankPools``, made when the first test asks for ``paddle_ranks``."""
    current_test: str = "session"
    reuse: bool = False
    """Whether the running test is marked ``paddle_ranks_reuse``: its calls reuse warm pools by default."""
    guard_wanted: bool = False
    early: dict[str, Any] = field(default_factory=dict)
    """The ``started_early`` calls, by test node id."""
    worker_stats: dict[str, Any] = field(default_factory=lambda: {"starts": 0, "calls": 0, "recycles": {}})
    """Under xdist, in the controller: what the workers' pools did, added up."""


_SESSION = pytest.StashKey[_Session]()
_WORKER_STATS = "paddle_ranks"
"""The key of an xdist worker's pool statistics in its ``workeroutput``."""
_DIST_MODE = "paddle_ranks_dist_mode"
"""The key of the controller's ``--dist`` mode in a worker's ``workerinput`` (xdist sets the worker's own to "no")."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("paddle_ranks", "multi-rank Paddle tests (the paddle_ranks fixture)")
    group.addoption(
        "--paddle-ranks-timeout",
        type=float,
        metavar="SECONDS",
        help=f"a rank call's default timeout (ini: paddle_ranks_timeout; default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.addini("paddle_ranks_timeout", f"a rank call's default timeout in seconds ({DEFAULT_TIMEOUT_S:g})")
    group.addoption(
        "--paddle-ranks-keep-logs",
        metavar="DIR",
        help="keep every rank's whole log of each failed call in DIR, one file per xdist worker, test, call and rank",
    )
    group.addoption(
        "--paddle-ranks-max-pools",
        type=int,
        metavar="N",
        help=f"how many warm rank pools a test process keeps (default {DEFAULT_MAX_POOLS})",
    )
    group.addoption(
        "--paddle-ranks-check-leaks",
        action="store_true",
        default=None,
        help="fail every test that leaves a rank process or a signal-group /dev/shm segment behind "
        "(ini: paddle_ranks_check_leaks)",
    )
    parser.addini("paddle_ranks_check_leaks", "the leak guard for every test (--paddle-ranks-check-leaks)", "bool")


def read_settings(config: pytest.Config) -> Settings:
    """The settings ``config`` gives; ``pytest.UsageError`` naming the option and the value for a bad one."""
    timeout = config.getoption("paddle_ranks_timeout")
    source = "--paddle-ranks-timeout"
    if timeout is None and config.getini("paddle_ranks_timeout"):
        source, raw = "ini paddle_ranks_timeout", config.getini("paddle_ranks_timeout")
        try:
            timeout = float(raw)
        except ValueError:
            raise pytest.UsageError(f"{source} must be a number of seconds, got {raw!r}") from None
    if timeout is not None and not 0 < timeout < math.inf:
        raise pytest.UsageError(f"{source} must be a finite number of seconds > 0, got {timeout!r}")
    max_pools = config.getoption("paddle_ranks_max_pools")
    if max_pools is not None and max_pools < 1:
        raise pytest.UsageError(f"--paddle-ranks-max-pools must be at least 1, got {max_pools}")
    keep_logs = config.getoption("paddle_ranks_keep_logs")
    check_leaks = config.getoption("paddle_ranks_check_leaks")
    return Settings(
        timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout,
        keep_logs=None if keep_logs is None else Path(keep_logs).resolve(),
        max_pools=DEFAULT_MAX_POOLS if max_pools is None else max_pools,
        check_leaks=bool(config.getini("paddle_ranks_check_leaks") if check_leaks is None else check_leaks),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "paddle_gpus(n): skip the test on a machine with fewer than n visible GPUs (counted without Paddle)",
    )
    config.addinivalue_line(
        "markers",
        "paddle_ranks_reuse(reason): the test's paddle_ranks calls reuse warm pools (reuse=True) unless a call says "
        "otherwise; a reused call shares what the pool's restore list does not put back (docs/paddle_ranks.md)",
    )
    config.addinivalue_line(
        "markers",
        "started_early(fn, nranks, *, kwargs, timeout, devices, env): the test's rank call is started in the "
        "background before the session's first test (under xdist --dist loadfile, before its file's first test); "
        "the test collects it from the started_early fixture",
    )
    config.stash[_SESSION] = _Session(read_settings(config))


def visible_gpus(environ: Mapping[str, str] = os.environ) -> int:
    """How many GPUs a process started with ``environ`` sees: NVIDIA's devices (``/proc/driver/nvidia/gpus``, else
    ``/dev/nvidiaN``), narrowed by ``CUDA_VISIBLE_DEVICES``, which CUDA reads up to its first invalid entry."""
    if _NVIDIA_GPUS.is_dir():
        installed = sum(1 for _ in _NVIDIA_GPUS.iterdir())
    else:
        installed = sum(1 for path in _DEV.glob("nvidia*") if path.name[len("nvidia") :].isdigit())
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return installed
    listed = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        listed += 1
    return min(listed, installed)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    # Kept logs are named after the test whose call failed, whichever fixture made the call.
    session = item.config.stash[_SESSION]
    session.current_test = item.nodeid
    session.reuse = item.get_closest_marker("paddle_ranks_reuse") is not None
    return (yield)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_short_of_gpus(items)
    session = config.stash[_SESSION]
    session.guard_wanted = session.settings.check_leaks or any(
        "paddle_ranks_leak_guard" in getattr(item, "fixturenames", ()) for item in items
    )
    if session.guard_wanted:
        guard = _load("fastdeploy_patch.testing.leak_guard")
        if guard is not None:
            # Before the first fixture: every rank and segment of the session carries the tag the guard looks for.
            guard.tag_this_process()


def skip_short_of_gpus(items: list[pytest.Item], count: Callable[[], int] = visible_gpus) -> None:
    """Mark every item whose ``paddle_gpus(n)`` asks for more GPUs than ``count()`` sees to be skipped, with why
    (a ``skipif`` marker: the report names the test's own line); ``pytest.UsageError`` for a marker without one
    integer."""
    seen = None
    for item in items:
        marker = item.get_closest_marker("paddle_gpus")
        if marker is None:
            continue
        if len(marker.args) != 1 or isinstance(marker.args[0], bool) or not isinstance(marker.args[0], int):
            raise pytest.UsageError(f"{item.nodeid}: paddle_gpus takes one integer (GPUs needed), got {marker.args}")
        seen = count() if seen is None else seen
        if seen < marker.args[0]:
            item.add_marker(pytest.mark.skipif(True, reason=f"needs {marker.args[0]} GPU(s), {seen} visible"))


def _load(name: str) -> ModuleType | None:
    """The module ``name`` of the package, or ``None`` when the package cannot be imported (no Paddle)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # An xdist worker sends its workeroutput once every sessionfinish hook ran, and unconfigures only after that: its
    # pools close here, so that what closing them counts (calls nobody collected) reaches the controller's summary.
    workeroutput = getattr(session.config, "workeroutput", None)
    pools = session.config.stash[_SESSION].pools
    if workeroutput is not None and pools is not None:
        pools.close()
        workeroutput[_WORKER_STATS] = pools.stats()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller, for each worker it starts: tell the worker how tests are handed out."""
    node.workerinput[_DIST_MODE] = node.config.getoption("dist")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist's controller, as each worker finishes: add what the worker's pools did to the session's summary."""
    stats = getattr(node, "workeroutput", {}).get(_WORKER_STATS)
    if stats is not None:
        totals = node.config.stash[_SESSION].worker_stats
        totals["starts"] += stats["starts"]
        totals["calls"] += stats["calls"]
        for reason, count in stats["recycles"].items():
            totals["recycles"][reason] = totals["recycles"].get(reason, 0) + count


def pytest_unconfigure(config: pytest.Config) -> None:
    # pytest unconfigures every plugin even when a configure hook raised before ours ran: a KeyError here would
    # replace that error with one about our stash.
    session = config.stash.get(_SESSION, None)
    if session is not None and session.pools is not None:
        session.pools.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash[_SESSION]
    stats = session.pools.stats() if session.pools is not None else session.worker_stats
    if stats["starts"]:
        terminalreporter.write_line(summary(stats))


def summary(stats: Mapping[str, Any]) -> str:
    """One line: pool starts, calls served, recycles and why."""
    starts, calls, recycles = stats["starts"], stats["calls"], stats["recycles"]
    why = ", ".join(f"{reason}: {count}" for reason, count in sorted(recycles.items()))
    total = sum(recycles.values())
    return (
        f"paddle_ranks: {starts} pool start{'s' * (starts != 1)}, {calls} call{'s' * (calls != 1)} served, "
        f"{total} recycle{'s' * (total != 1)}" + (f" ({why})" if why else "")
    )


@pytest.fixture(scope="session")
def paddle_ranks_env() -> dict[str, str]:
    """Extra environment for every pool rank of the session; override it in a conftest (default: none)."""
    return {}


@pytest.fixture(scope="session")
def paddle_ranks(request: pytest.FixtureRequest, paddle_ranks_env: Mapping[str, str]) -> Any:
    """Multi-rank calls, each on a fresh world by default: ``paddle_ranks.run(fn, nranks, ...)``
    (``fastdeploy_patch.testing.plugin.PaddleRanks``). Session-scoped, so fixtures of any scope can use it. Without
    Paddle, every test that uses it errors with what to install."""
    try:
        from fastdeploy_patch.testing import plugin
    except ImportError as exc:
        pytest.fail(f"{INSTALL_HINT}. Importing it failed: {exc}", pytrace=False)
    session = request.config.stash[_SESSION]
    if session.pools is None:
        session.pools = plugin.new_pools(request.config, session.settings, lambda: session.current_test)
    return plugin.PaddleRanks(
        session.pools, paddle_ranks_env, timeout=session.settings.timeout, reuse=lambda: session.reuse
    )


@pytest.fixture(scope="session")
def paddle_ranks_segment_prefixes() -> list[str]:
    """More /dev/shm name prefixes the leak guard watches (the test process's own segments); override it in a
    conftest. Signal-group segments of the session's ranks are always watched."""
    return []


@pytest.fixture
def paddle_ranks_leak_guard(
    request: pytest.FixtureRequest, paddle_ranks_segment_prefixes: list[str]
) -> Iterator[None]:
    """Fail the test if it leaves a rank process or a /dev/shm segment behind, naming them (the pools' ranks, which
    outlive tests on purpose, excepted). Use it in a conftest (an autouse fixture asking for it), or turn it on for
    every test with ``--paddle-ranks-check-leaks``."""
    guard = _load("fastdeploy_patch.testing.leak_guard")
    if guard is None:
        # Without the package no rank of ours can have started: there is nothing to guard.
        yield
        return
    session = request.config.stash[_SESSION]
    before = guard.our_segments(paddle_ranks_segment_prefixes)
    yield
    problems = guard.leaks(before, paddle_ranks_segment_prefixes, session.pools)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _paddle_ranks_check_leaks(request: pytest.FixtureRequest) -> None:
    if request.config.stash[_SESSION].settings.check_leaks:
        request.getfixturevalue("paddle_ranks_leak_guard")


def _is_xdist_worker(config: pytest.Config) -> bool:
    # A worker collects every test but runs only those the controller hands it.
    return hasattr(config, "workerinput")


def _runs_whole_files(config: pytest.Config) -> bool:
    return _is_xdist_worker(config) and config.workerinput.get(_DIST_MODE) in ("loadfile", "loadscope")


def _start_marked(items: list[pytest.Item], request: pytest.FixtureRequest) -> None:
    early = request.config.stash[_SESSION].early
    for item in items:
        marker = item.get_closest_marker("started_early")
        if marker is not None and item.nodeid not in early:
            early[item.nodeid] = request.getfixturevalue("paddle_ranks").start(*marker.args, **marker.kwargs)


@pytest.fixture(scope="session", autouse=True)
def _paddle_ranks_early_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before the first test: the calls of the selected tests marked ``started_early``, running in the background
    on worlds of their own. Not in an xdist worker, which would start the calls of tests other workers run: there
    the first test of each file starts them (``--dist loadfile``), else the test itself. Calls left uncollected are
    killed at the end of the session. A session without the marker pays nothing."""
    if not _is_xdist_worker(request.config):
        _start_marked(request.session.items, request)
    yield
    for call in request.config.stash[_SESSION].early.values():
        call.cancel()


@pytest.fixture(scope="module", autouse=True)
def _paddle_ranks_early_calls_of_this_file(request: pytest.FixtureRequest, _paddle_ranks_early_calls: None) -> None:
    if _runs_whole_files(request.config):
        _start_marked([item for item in request.session.items if item.path == request.path], request)


@pytest.fixture
def started_early(request: pytest.FixtureRequest, _paddle_ranks_early_calls: None) -> Any:
    """The call of the test's ``started_early`` marker (a ``StartedRanks``: ``.result()``), started before the
    session's first test, before its file's first test (xdist ``--dist loadfile``), or now (other xdist modes)."""
    if request.node.get_closest_marker("started_early") is None:
        pytest.fail(f"{request.node.nodeid} uses the started_early fixture without the started_early marker")
    _start_marked([request.node], request)
    return request.config.stash[_SESSION].early[request.node.nodeid]
