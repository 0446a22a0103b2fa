"""Shared fixtures for real multi-rank tests: every test here is marked ``distributed``, has a timeout, and
fails if it leaves a rank process or one of its shared-memory segments behind. The ranks of the ``paddle_ranks``
pools are the one exception: they outlive tests on purpose, and the pools list them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.signal_group import SEGMENT_PREFIX, SEGMENT_TAG_ENV, SHM_DIR
from fastdeploy_patch.testing.plugin import PaddleRanks, StartedRanks
from tests.distributed.harness import RUN_TAG, RUN_TAG_VAR

# Tagged with this run: other runs on a shared machine make status segments of their own meanwhile.
SHM_PREFIX = f"fdp_dist_{RUN_TAG[:8]}_"
# Every process this test process starts (pool ranks, the CLI's ranks) inherits the tag and puts it in the names of
# the signal-group segments it creates: the leak checks look at this test process's segments only, while other xdist
# workers and other suites on the host create and remove theirs.
SEGMENT_TAG = f"{RUN_TAG[:8]}p{os.getpid()}"
os.environ[SEGMENT_TAG_ENV] = SEGMENT_TAG
OUR_SEGMENT_PREFIX = f"{SEGMENT_PREFIX}{SEGMENT_TAG}_"
DEFAULT_TEST_TIMEOUT_S = 150
LEFTOVER_GRACE_S = 5.0
SEGMENT_GRACE_S = 1.0
"""A signal-group segment is unlinked within milliseconds of its creation: one still there after this long has
leaked (one seen only at the first look may belong to another run creating its group right then)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "started_early(fn, nranks, *, kwargs, timeout): the test's rank call is started in the background before "
        "the session's first test (in an xdist worker that runs whole files, before the first test of its file), "
        "and the test collects it from the `started_early` fixture",
    )


def is_xdist_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker: it collects every test but runs only those the controller
    hands it, so no fixture of its own can know before the session which tests it will run."""
    return hasattr(config, "workerinput")


_DIST_MODE = "fdp_dist_mode"
"""The key of the controller's ``--dist`` mode in a worker's ``workerinput`` (xdist sets the worker's own to "no")."""


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller, for each worker it starts: tell the worker how tests are handed out."""
    node.workerinput[_DIST_MODE] = node.config.getoption("dist")


def runs_whole_files(config: pytest.Config) -> bool:
    """Whether this xdist worker gets every test of a file once it gets one (``--dist loadfile`` or ``loadscope``)."""
    return is_xdist_worker(config) and config.workerinput.get(_DIST_MODE) in ("loadfile", "loadscope")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.distributed)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def paddle_ranks_env() -> dict[str, str]:
    """Pool ranks carry this run's tag like every other rank the suite starts, so that one the pools lost track of
    is found by the stray-process check."""
    return {RUN_TAG_VAR: RUN_TAG}


def tagged_processes(kept: Collection[int] = ()) -> dict[int, str]:
    """Live processes started by this test run (ranks and anything they spawned): ``{pid: command}``, but for those
    in the sessions of the ranks ``kept`` (every rank leads a session of its own).

    Zombies are left out: they hold no resources and only wait for their new parent to reap them.
    """
    found = {}
    needle = f"{RUN_TAG_VAR}={RUN_TAG}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            state, session = fields[0], int(fields[3])
            if state != "Z" and session not in kept and needle in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


def stray_processes(kept: Callable[[], Collection[int]] = list, grace: float = LEFTOVER_GRACE_S) -> dict[int, str]:
    """Tagged processes, but for those of the ranks ``kept()`` names, still alive after ``grace`` seconds; they are
    killed before being returned.

    The grace covers helpers (multiprocessing's resource tracker) that exit on their own once a rank is gone, and
    ranks of a retired pool that are still being reaped.
    """
    deadline = time.monotonic() + grace
    while (found := tagged_processes(kept())) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


def our_segments() -> set[str]:
    """The segments that this test process's status signals, and the signal groups of the processes it started,
    leave in /dev/shm."""
    shm = Path(SHM_DIR)
    prefixes = (SHM_PREFIX, OUR_SEGMENT_PREFIX)
    return {p.name for p in shm.iterdir() if p.name.startswith(prefixes)} if shm.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _early_calls(request: pytest.FixtureRequest, paddle_ranks: PaddleRanks) -> Iterator[dict[str, StartedRanks]]:
    """Before the first test: the calls of the selected tests marked ``started_early``, running in the background
    on worlds of their own (a call that mostly waits overlaps the tests before its own). Calls left uncollected are
    killed at the end of the session.

    Not in an xdist worker, which would start the calls of tests that other workers run: there
    ``_early_calls_of_this_file`` starts them when the worker gets whole files, else ``started_early`` does."""
    started: dict[str, StartedRanks] = {}
    if not is_xdist_worker(request.config):
        _start_marked(request.session.items, started, paddle_ranks)
    yield started
    for call in started.values():
        call.cancel()


@pytest.fixture(scope="module", autouse=True)
def _early_calls_of_this_file(
    request: pytest.FixtureRequest, _early_calls: dict[str, StartedRanks], paddle_ranks: PaddleRanks
) -> None:
    """In an xdist worker that runs whole files, at the first test of each: the file's ``started_early`` calls, which
    then overlap the file's other tests (a marked test comes last in its file)."""
    if runs_whole_files(request.config):
        this_file = [item for item in request.session.items if item.path == request.path]
        _start_marked(this_file, _early_calls, paddle_ranks)


def _start_marked(items: list[pytest.Item], started: dict[str, StartedRanks], paddle_ranks: PaddleRanks) -> None:
    for item in items:
        marker = item.get_closest_marker("started_early")
        if marker is not None and item.nodeid not in started:
            started[item.nodeid] = paddle_ranks.start(*marker.args, **marker.kwargs)


@pytest.fixture
def started_early(
    request: pytest.FixtureRequest, _early_calls: dict[str, StartedRanks], paddle_ranks: PaddleRanks
) -> StartedRanks:
    """The call of the test's ``started_early`` marker, started before the session's first test, before its file's
    first test (an xdist worker that runs whole files), or now (an xdist worker that runs single tests)."""
    if request.node.get_closest_marker("started_early") is None:
        pytest.fail(f"{request.node.nodeid} uses the started_early fixture without the started_early marker")
    _start_marked([request.node], _early_calls, paddle_ranks)
    return _early_calls[request.node.nodeid]


def leaked_segments(before: set[str]) -> set[str]:
    """Our segments that were not in ``before`` and are still there ``SEGMENT_GRACE_S`` after the first look: a
    signal group that other tests (another xdist worker, another run) create meanwhile has its segment for
    milliseconds only."""
    new_segments = our_segments() - before
    if new_segments:
        time.sleep(SEGMENT_GRACE_S)
        new_segments &= our_segments()
    return new_segments


@pytest.fixture(autouse=True)
def _nothing_left_behind(paddle_ranks: PaddleRanks) -> Iterator[None]:
    segments_before = our_segments()
    yield
    leftovers = stray_processes(paddle_ranks.live_pids)
    assert not leftovers, f"rank processes outlived the test: {leftovers}"
    new_segments = leaked_segments(segments_before)
    assert not new_segments, f"shared-memory segments leaked: {sorted(new_segments)}"


def new_status_signal(initial: int = 0) -> StatusSignal:
    """A status segment owned by the test process (the engine's role), under this suite's name prefix."""
    return StatusSignal(f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}", create=True, initial=initial)


@pytest.fixture
def status_signal() -> Iterator[StatusSignal]:
    with new_status_signal() as signal:
        yield signal
