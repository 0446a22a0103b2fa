"""Start N real Paddle ranks as subprocesses, collect their JSON results, and never leave one behind: the CLI's
``demo``, ``bench`` and ``smoke``, and tests of ranks placed on other "hosts", run ranks this way.

Every rank runs ``module:function(**kwargs)`` after ``paddle.distributed.init_parallel_env()`` (``rank_entry``) and
writes its result to a file. The processes are ``rank_processes``': started by ``start_rank``, killed all at once as
soon as one fails, and on timeout asked for every thread's stack before being killed; failures are that module's
errors, in its one format. Ranks are plain subprocesses (not ``spawn``/``launch``) so that a survivor's own error is
seen. By default every rank runs here on loopback; a ``RankPlacement`` per rank puts ranks elsewhere (another
address, a command such as ``nsenter`` in front, extra environment), which is how tests simulate several hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdeploy_patch.testing.rank_entry import READY_SUFFIX
from fastdeploy_patch.testing.rank_processes import (
    PARENT_VAR,
    RANK_PRELUDE,
    START_TIMEOUT_S,
    RankError,
    RankFailed,
    RankProcess,
    RankSpec,
    RankTimeout,
    exit_description,
    kill_ranks,
    stacks,
    start_rank,
    wait_any,
)
from fastdeploy_patch.testing.rank_world import LOOPBACK, RankPlacement, free_ports, rank_env

__all__ = [
    "LOOPBACK",
    "PARENT_VAR",
    "RANK_BOOTSTRAP",
    "RANK_PRELUDE",
    "START_TIMEOUT_S",
    "RankError",
    "RankFailed",
    "RankPlacement",
    "RankTimeout",
    "exit_description",
    "free_ports",
    "rank_env",
    "run_ranks",
]

RANK_BOOTSTRAP = RANK_PRELUDE + "from fastdeploy_patch.testing.rank_entry import main; sys.exit(main(sys.argv[1:]))"
"""What each rank's interpreter runs (``python -c RANK_BOOTSTRAP SPEC_PATH RESULT_PATH``)."""


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
    default all on loopback, here). ``backend="nccl"``: rank ``r`` uses GPU ``r``.

    Raises ``RankFailed`` as soon as one rank exits non-zero, and ``RankTimeout`` when the ranks are not all ready
    (joined, target imported) within ``start_timeout`` seconds or did not all finish ``timeout`` seconds after
    that; in every case, and on ``KeyboardInterrupt``, every rank and its children are killed first. A rank whose
    test process dies without cleanup dies with it (``RANK_PRELUDE``). A rank's exit is seen at once; the ready files
    and the deadline are looked at every ``poll_interval`` seconds.
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
        ranks: list[RankProcess] = []
        try:
            for rank in range(nranks):
                ranks.append(start_rank(_spec(rank, ports, workdir, spec_path, backend, env, placements)))
            _wait(ranks, target, timeout, poll_interval, start_timeout)
            return [json.loads(_result_path(r).read_text()) for r in ranks]
        finally:
            kill_ranks(ranks)


def _result_path(r: RankProcess) -> Path:
    return r.log_path.with_suffix(".json")


def _spec(
    rank: int,
    ports: list[int],
    workdir: Path,
    spec_path: Path,
    backend: str,
    env: Mapping[str, str] | None,
    placements: list[RankPlacement],
) -> RankSpec:
    log_path = workdir / f"rank{rank}.log"
    placement = placements[rank]
    hosts = [p.host for p in placements]
    child_env = {
        **os.environ,
        **(env or {}),
        **placement.env,
        **rank_env(rank, len(placements), ports, backend=backend, hosts=hosts),
    }
    argv = (
        *placement.command_prefix,
        sys.executable,
        "-c",
        RANK_BOOTSTRAP,
        str(spec_path),
        str(workdir / f"rank{rank}.json"),
    )
    return RankSpec(rank, argv, child_env, log_path)


def _ready(r: RankProcess) -> bool:
    """Whether the rank joined the world and imported its target (or already finished)."""
    result = _result_path(r)
    return result.with_name(result.name + READY_SUFFIX).exists() or result.exists()


def _wait(ranks: list[RankProcess], target: str, timeout: float, poll_interval: float, start_timeout: float) -> None:
    deadline, ready = time.monotonic() + start_timeout, False
    while True:
        pending = []
        for r in ranks:
            code = r.process.poll()
            if code is None:
                pending.append(r.rank)
            elif code != 0:
                kill_ranks(ranks)
                raise RankFailed(
                    rank=r.rank,
                    nranks=len(ranks),
                    target=target,
                    returncode=code,
                    reports={o.rank: o.log_tail() for o in ranks},
                )
        if not pending:
            return
        if not ready and all(_ready(r) for r in ranks):
            deadline, ready = time.monotonic() + timeout, True
        left = deadline - time.monotonic()
        if left <= 0:
            raise RankTimeout(
                ranks=pending,
                nranks=len(ranks),
                target=target,
                timeout=timeout if ready else start_timeout,
                reports=stacks(ranks),
                during="" if ready else " while the ranks started",
            )
        # An exit wakes this at once (pidfds; finished ranks are left out, theirs stay readable); the ready files and
        # the clock are looked at every poll_interval.
        wait_any([r for r in ranks if r.rank in pending], timeout=min(left, poll_interval))
