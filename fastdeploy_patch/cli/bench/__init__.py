"""The side-by-side signal-sync benchmarks behind ``fastdeploy-patch bench``, one module per mode:

- ``latency`` (the default): the per-step status sync done each way (legacy, gloo, shm) on every rank;
- ``jitter`` (``--jitter``): loop time per step when every rank does its own CPU work each step;
- ``late_src`` (``--src-late MS``): how fast a waiting reader wakes when the src publishes late, over a bare futex
  floor;

``timing`` times the latency and jitter paths, ``reports`` turns what the ranks return into reports. ``MODES`` says,
per mode, what its ranks run and which report it makes; the command (``cli/__init__.py``) only looks a mode up.
docs/benchmarks.md has what each mode measures and figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastdeploy_patch.cli.bench import late_src, latency, reports

START_S = 120.0
"""What the default timeout allows the ranks to start (import Paddle, rendezvous, make the groups) on a busy host."""

STEP_S = 0.02
"""What the default timeout allows each of ``iters + warmup`` steps, all paths' together: far above their p99s here."""

LATE_SPARE = 1.25
"""The default timeout allows each late step its sleep and a quarter more."""


@dataclass(frozen=True)
class Run:
    """One ``bench`` command's settings, as its report records them; ``late_ms`` only for ``--src-late``."""

    nranks: int
    iters: int
    warmup: int
    backend: str
    paddle_version: str
    late_ms: float | None = None

    def rank_kwargs(self) -> dict[str, float]:
        """The keyword arguments of a mode's rank function."""
        late = {} if self.late_ms is None else {"late_ms": self.late_ms}
        return {"iters": self.iters, "warmup": self.warmup, **late}

    def default_timeout(self) -> float:
        """Seconds before the ranks are killed when ``--timeout`` is not given: a bound against a hang, generous on
        a shared host. Each path's timed steps sleep ``late_ms`` first; warm-up steps do not."""
        late_s = (self.late_ms or 0.0) / 1000.0
        return START_S + (self.iters + self.warmup) * STEP_S + self.iters * len(late_src.LABELS) * LATE_SPARE * late_s


@dataclass(frozen=True)
class Mode:
    """One benchmark: what every rank runs, what the progress line calls its steps, and how the ranks' results
    become its report and its table."""

    rank_function: str
    steps: str
    report: Callable[[list[dict], Run], dict[str, Any]]
    table: Callable[[Mapping[str, Any]], str]

    def progress(self, run: Run) -> str:
        """The line that says what is about to run (on stderr: stdout carries only the report)."""
        steps = self.steps.format(late_ms=run.late_ms)
        return f"bench: {run.nranks} ranks ({run.backend}), {run.warmup} warm-up + {run.iters} {steps} per path..."


def _figures(run: Run) -> dict[str, Any]:
    return {"nranks": run.nranks, "iters": run.iters, "warmup": run.warmup, "paddle_version": run.paddle_version}


MODES = {
    "latency": Mode(
        rank_function="fastdeploy_patch.cli.bench.latency:latency_rank",
        steps="timed steps",
        report=lambda results, run: reports.build_latency_report(results, backend=run.backend, **_figures(run)),
        table=reports.format_latency_report,
    ),
    "jitter": Mode(
        rank_function="fastdeploy_patch.cli.bench.jitter:jitter_rank",
        steps="loop steps with per-rank CPU work",
        report=lambda results, run: reports.build_jitter_report(results, **_figures(run)),
        table=reports.format_jitter_report,
    ),
    "src_late": Mode(
        rank_function="fastdeploy_patch.cli.bench.late_src:late_rank",
        steps="steps with the src {late_ms:g} ms late",
        report=lambda results, run: reports.build_late_report(results, late_ms=run.late_ms, **_figures(run)),
        table=reports.format_late_report,
    ),
}
"""Every benchmark by the name its report gives as ``mode``."""


def mode_for(jitter: bool, src_late_ms: float | None) -> Mode:
    """The benchmark the command's flags ask for (the parser refuses ``--jitter`` with ``--src-late``)."""
    if src_late_ms is not None:
        return MODES["src_late"]
    return MODES["jitter" if jitter else "latency"]


def pick_backend(nranks: int) -> str:
    """The default group's backend for the ranks: NCCL when there is a GPU per rank (as in production), else
    gloo."""
    return "nccl" if latency.gpu_available(nranks) else "gloo"
