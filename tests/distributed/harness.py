"""Launching ranks the way the CLI does, ``fastdeploy_patch.testing.launcher.run_ranks``, for the tests of that
launch itself and of ranks placed in network namespaces (every other test uses the ``paddle_ranks`` pools), with
pytest-facing failures and the plugin's run tag, which lets the leak guard prove no rank outlived its test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from fastdeploy_patch.testing.launcher import RankError, RankPlacement, run_ranks
from fastdeploy_patch.testing.leak_guard import RUN_TAG, RUN_TAG_VAR

REPO_ROOT = Path(__file__).resolve().parents[2]

RANK_TIMEOUT_S = 90.0
"""How long one launch may take; below each test's pytest-timeout so the rank stacks get shown first."""


def rank_env() -> dict[str, str]:
    """The environment ranks get on top of ours: the repo root importable, whatever the working directory."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""),
        RUN_TAG_VAR: RUN_TAG,
    }


def target_of(fn: Callable[..., Any]) -> str:
    """The ``module:function`` string the launcher imports in each rank."""
    return f"{fn.__module__}:{fn.__qualname__}"


def run_ranks_or_fail(
    fn: Callable[..., Any],
    nranks: int,
    *,
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = RANK_TIMEOUT_S,
    backend: str = "gloo",
    placements: Sequence[RankPlacement] | None = None,
) -> list[Any]:
    """Run ``fn(**kwargs)`` on ``nranks`` real ranks (placed by ``placements``, default all here on loopback) and
    return each rank's result, indexed by rank.

    A rank that fails or a launch that times out becomes a pytest failure with the launcher's report (the failing
    rank's log first, the other ranks' log tails after, or every hung rank's stack); every rank is dead by then.
    """
    target = target_of(fn)
    try:
        return run_ranks(
            target, nranks, kwargs=kwargs, timeout=timeout, backend=backend, env=rank_env(), placements=placements
        )
    except RankError as exc:
        failure = str(exc)
    # Outside the except block: the report is the message alone, not chained to the exception that carried it.
    pytest.fail(failure, pytrace=False)
