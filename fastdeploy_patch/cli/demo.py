"""The RL weight-update demo behind ``fastdeploy-patch demo``.

N CPU ranks run the worker event loop while a driver in the parent plays the engine: it asks for CLEARING
through the shared-memory status, waits for rank 0's weight manager to answer CLEARED, holds that for a few
steps (the trainer's update), then asks for UPDATING and waits for NORMAL. Every rank must see each change at
the same step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastdeploy_patch.cli.bench.reports import percentile_us
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.status import ModelWeightsStatus

MIN_STEPS = 20
"""Fewest steps that leave room for a whole clear/update cycle after the ranks start."""

STEPS_PER_LOOKAHEAD = 5
"""Extra steps the cycle needs per step of lookahead: each of its requests and answers takes effect that much
later (4 delays in a cycle, plus slack)."""


def min_steps(lookahead: int) -> int:
    """Fewest steps that leave room for a whole clear/update cycle with ``lookahead``."""
    return MIN_STEPS + STEPS_PER_LOOKAHEAD * lookahead


DEFAULT_STEP_INTERVAL_S = 0.01
"""Pause after each step; it paces the ranks so that the driver (polling every millisecond) sees every phase."""

EXPECTED_CYCLE = (
    ModelWeightsStatus.CLEARING,
    ModelWeightsStatus.CLEARED,
    ModelWeightsStatus.UPDATING,
    ModelWeightsStatus.NORMAL,
)
"""The transitions every rank must see, in order, in one demo run."""


class _WatchedStatus:
    """The engine's status segment as rank 0's worker sees it, noting each step at which the value read from it
    changes: the step the worker publishes a request (or its own answer) to the other ranks."""

    def __init__(self, signal: StatusSignal) -> None:
        self._signal = signal
        self.value = _WatchedValue(signal.value)

    def __getattr__(self, name: str) -> object:
        return getattr(self._signal, name)


class _WatchedValue:
    def __init__(self, array: object) -> None:
        self._array = array
        self.step = 0
        self._last = int(ModelWeightsStatus.NORMAL)
        self.changes: list[list] = []

    def __getitem__(self, index: int) -> object:
        value = self._array[index]
        if int(value) != self._last:
            self._last = int(value)
            self.changes.append([self.step, ModelWeightsStatus(self._last).name])
        return value

    def __setitem__(self, index: int, value: object) -> None:
        self._array[index] = value


def demo_rank(
    status_name: str, progress_name: str, steps: int, step_interval: float, transport: str = "auto", lookahead: int = 0
) -> dict:
    """On one rank: run ``steps`` event-loop steps of a small model over a signal group of ``transport`` and
    ``lookahead``, rank 0 reading the engine's status from the shared memory ``status_name`` and publishing its
    step count in ``progress_name``.

    Returns what this rank saw: steps run, transitions ``[step, status name]``, the group's transport, the
    weight manager's counters, the signal-sync latency p50/p99 in microseconds and, on rank 0, the steps at
    which it read each new status (``published``).
    """
    import paddle
    import paddle.distributed as dist

    from fastdeploy_patch.worker.worker_process import SIGNAL_SRC, WorkerProcess

    on_src = dist.get_rank() == SIGNAL_SRC
    status = StatusSignal(status_name) if on_src else None
    progress = StatusSignal(progress_name) if on_src else None
    watched = _WatchedStatus(status) if status is not None else None
    try:
        paddle.seed(0)
        model = paddle.nn.Linear(16, 16)
        worker = WorkerProcess(
            model,
            status_signal=watched,
            signal_transport=transport,
            signal_lookahead=lookahead,
            forward_input=paddle.ones([4, 16]),
        )
        # Stepping here rather than with event_loop() lets rank 0 publish its progress after every step.
        for _ in range(steps):
            if watched is not None:
                watched.value.step = worker.steps + 1
            worker.event_loop_step()
            if progress is not None:
                progress.value[0] = worker.steps
            if step_interval:
                time.sleep(step_interval)
    finally:
        for signal in (status, progress):
            if signal is not None:
                signal.close()
    manager = worker.weight_manager
    group = worker.signal_group
    return {
        "rank": worker.rank,
        "transport": group.transport if group is not None else "none",
        "lookahead": lookahead,
        "steps": worker.steps,
        "transitions": [[step, seen.name] for step, seen in worker.transitions],
        "published": watched.value.changes if watched is not None else [],
        "parameters_released": manager.parameters_released,
        "parameters_restored": manager.parameters_restored,
        "groups_shut_down": manager.groups_shut_down,
        "groups_restarted": manager.groups_restarted,
        "forward_passes": worker.forward_passes,
        "sync_p50_us": percentile_us(worker.sync_latencies_ns, 50),
        "sync_p99_us": percentile_us(worker.sync_latencies_ns, 99),
    }


class DriverError(RuntimeError):
    """The driver did not see the ranks go through the clear/update cycle."""


@dataclass
class Driver:
    """The engine's side of the demo: requests CLEARING, then UPDATING, through the shared-memory status.

    ``status`` and ``progress`` are the segments rank 0 attaches to. ``poll()`` advances the cycle by at most
    one phase; ``run()`` polls until the ranks stop, printing each phase change and the progress.
    """

    status: StatusSignal
    progress: StatusSignal
    steps: int
    out: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    poll_interval: float = 0.001
    progress_every: float = 2.0
    error: str | None = None
    _phase: int = 0
    _cleared_at: int = 0
    _started: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def clear_at(self) -> int:
        """The step after which CLEARING is requested."""
        return max(1, self.steps // 4)

    @property
    def hold_steps(self) -> int:
        """Steps the weights stay CLEARED before UPDATING is requested."""
        return max(2, self.steps // 10)

    @property
    def done(self) -> bool:
        """Whether the whole cycle was seen."""
        return self._phase == len(_PHASES)

    @property
    def waiting_for(self) -> str:
        """What the driver waits for now."""
        return _PHASES[self._phase] if not self.done else "the ranks to finish"

    def _say(self, text: str) -> None:
        line = f"[engine] step {self.step}/{self.steps}: {text}"
        self.log.append(line)
        self.out(line)

    @property
    def step(self) -> int:
        """The last step rank 0 finished."""
        return int(self.progress.value[0])

    def poll(self) -> None:
        """Look at rank 0's progress and the status once, and take the next action when it is due."""
        step, status = self.step, int(self.status.value[0])
        if not self._started and step > 0:
            self._started = True
            self._say("the ranks are running")
        if self._phase == 0 and step >= self.clear_at:
            self.status.value[0] = ModelWeightsStatus.CLEARING
            self._say("requested CLEARING (release the weights)")
        elif self._phase == 1 and status == ModelWeightsStatus.CLEARED:
            self._cleared_at = step
            self._say("rank 0 reports CLEARED: weights released, the trainer updates them")
        elif self._phase == 2 and step >= self._cleared_at + self.hold_steps:
            self.status.value[0] = ModelWeightsStatus.UPDATING
            self._say("requested UPDATING (reload the weights)")
        elif self._phase == 3 and status == ModelWeightsStatus.NORMAL:
            self._say("rank 0 reports NORMAL: weights restored")
        else:
            return
        self._phase += 1

    def run(self, stop: threading.Event, timeout: float) -> None:
        """Poll until ``stop`` is set. Sets ``error`` when the ranks stop, or ``timeout`` seconds pass, before
        the cycle is complete; the ranks' own outcome is left to the caller."""
        deadline = self.clock() + timeout
        next_report: float | None = None
        while not stop.is_set():
            self.poll()
            now = self.clock()
            if not self.done and now >= deadline:
                self.error = f"no sign of {self.waiting_for} within {timeout:g} s (rank 0 at step {self.step})"
                return
            if next_report is None:
                # The first report comes one period after the ranks start, not after the long start-up.
                next_report = now + self.progress_every if self._started else None
            elif now >= next_report:
                self._say("running")
                next_report = now + self.progress_every
            self.sleep(self.poll_interval)
        self.poll()
        if not self.done:
            self.error = f"the ranks stopped at step {self.step} before {self.waiting_for}"


_PHASES = (
    "rank 0 reaching the step to request CLEARING",
    "rank 0 reporting CLEARED",
    "the end of the CLEARED hold",
    "rank 0 reporting NORMAL",
)


def check_demo(results: Sequence[dict], steps: int) -> list[str]:
    """Return the problems in the ranks' demo results (empty when every rank ran ``steps`` steps, saw the whole
    clear/update cycle at the same steps as rank 0, exactly the lookahead's number of steps after rank 0 read
    each status, and restored every parameter it released)."""
    problems = []
    first = results[0]
    reference = first["transitions"]
    seen = tuple(ModelWeightsStatus[name] for _, name in reference)
    if seen != EXPECTED_CYCLE:
        wanted = ", ".join(s.name for s in EXPECTED_CYCLE)
        problems.append(f"rank 0 saw transitions {_transitions(reference)}, expected {wanted} in that order")
    lookahead = first["lookahead"]
    expected = [[step + lookahead, name] for step, name in first["published"] if step + lookahead <= steps]
    if reference != expected:
        problems.append(
            f"rank 0 read {_transitions(first['published'])} from the engine, so with lookahead {lookahead} every "
            f"rank should see {_transitions(expected)}, but rank 0 saw {_transitions(reference)}"
        )
    for result in results:
        rank = result["rank"]
        if result["steps"] != steps:
            problems.append(f"rank {rank} ran {result['steps']} steps, expected {steps}")
        if result["transitions"] != reference:
            problems.append(
                f"rank {rank} saw {_transitions(result['transitions'])} but rank 0 saw {_transitions(reference)}"
            )
        released, restored = result["parameters_released"], result["parameters_restored"]
        if released == 0 or released != restored:
            problems.append(f"rank {rank} released {released} parameters and restored {restored}")
    return problems


def ranks_agree(results: Sequence[dict]) -> bool:
    """Whether every rank ran as many steps and saw the same transitions at the same steps."""
    first = results[0]
    return all(r["steps"] == first["steps"] and r["transitions"] == first["transitions"] for r in results)


def _transitions(transitions: Sequence[Sequence]) -> str:
    return " ".join(f"{name}@{step}" for step, name in transitions) or "none"


_COLUMNS = (
    "rank",
    "transport",
    "steps",
    "transitions (status@step)",
    "params released/restored",
    "groups down/restarted",
    "sync p50 us",
    "sync p99 us",
)


def format_table(results: Sequence[dict]) -> str:
    """The summary table: one row per rank, then when rank 0 read each status and when it took effect, then
    whether the ranks agree."""
    rows = [
        (
            str(r["rank"]),
            r["transport"],
            str(r["steps"]),
            _transitions(r["transitions"]),
            f"{r['parameters_released']}/{r['parameters_restored']}",
            f"{r['groups_shut_down']}/{r['groups_restarted']}",
            f"{r['sync_p50_us']:.1f}",
            f"{r['sync_p99_us']:.1f}",
        )
        for r in results
    ]
    widths = [max(len(cells[i]) for cells in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) for cells in [_COLUMNS, *rows]
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    lookahead = results[0]["lookahead"]
    later = f"{lookahead} steps later" if lookahead else "at the same step"
    lines.append(
        f"rank 0 read from the engine: {_transitions(results[0]['published'])} (lookahead {lookahead}: "
        f"every rank acts on each {later})"
    )
    lines.append(f"ranks agree: {'yes' if ranks_agree(results) else 'NO'}")
    return "\n".join(line.rstrip() for line in lines)
