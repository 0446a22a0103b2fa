"""Shared fixtures for real multi-rank tests: every test here is marked ``distributed``, has a timeout, and fails if
it leaves a rank process or one of its shared-memory segments behind (the ``paddle_ranks`` plugin's leak guard; the
ranks of its pools outlive tests on purpose, and the pools list them). The ``started_early`` marker and fixture are
the plugin's too."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.testing.leak_guard import RUN_TAG

# Tagged with this run: other runs on a shared machine make status segments of their own meanwhile.
SHM_PREFIX = f"fdp_dist_{RUN_TAG[:8]}_"
DEFAULT_TEST_TIMEOUT_S = 150


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.distributed)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def paddle_ranks_segment_prefixes() -> list[str]:
    """The status segments this suite's tests create (``new_status_signal``) are watched too."""
    return [SHM_PREFIX]


@pytest.fixture(autouse=True)
def _nothing_left_behind(paddle_ranks_leak_guard: None) -> None:
    """Every test here runs under the plugin's leak guard."""


def new_status_signal(initial: int = 0) -> StatusSignal:
    """A status segment owned by the test process (the engine's role), under this suite's name prefix."""
    return StatusSignal(f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}", create=True, initial=initial)


@pytest.fixture
def status_signal() -> Iterator[StatusSignal]:
    with new_status_signal() as signal:
        yield signal
