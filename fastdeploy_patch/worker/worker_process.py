"""The worker's event loop: the model-weights status synced from rank 0 every step over the CPU signal group."""

from __future__ import annotations

import datetime
import time

import paddle
import paddle.distributed as dist

from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.rl.dynamic_weight_manager import DynamicWeightManager
from fastdeploy_patch.signal_group import RENDEZVOUS_TIMEOUT_S, SignalGroup, broadcast_signal, new_signal_group
from fastdeploy_patch.status import ModelWeightsStatus

SIGNAL_SRC = 0
"""The tensor-parallel rank that reads the engine's status and broadcasts it."""


class WorkerProcess:
    """One tensor-parallel rank's worker: a model, its weight manager and the event loop.

    With more than one rank it creates its signal group exactly once, here, before any loop step: creating a
    gloo group inside the loop is what broke upstream's integration tests. ``signal_timeout`` (each call's),
    ``signal_create_timeout`` (the creation's, on every rank), ``signal_transport`` and ``signal_lookahead`` go to
    ``new_signal_group``: with lookahead d, the status rank 0 reads at step s takes
    effect on every rank at step s + d (a single rank has no group, and no delay). ``status_signal`` is the
    engine's shared-memory status and is required on rank 0, which alone reads it. ``forward_input``, when given,
    is fed to the model on every NORMAL step, standing in for a batch of inference.
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        *,
        status_signal: StatusSignal | None = None,
        signal_timeout: float | datetime.timedelta | None = None,
        signal_create_timeout: float | datetime.timedelta = RENDEZVOUS_TIMEOUT_S,
        signal_transport: str = "auto",
        signal_lookahead: int = 0,
        forward_input: paddle.Tensor | None = None,
    ) -> None:
        self.rank = dist.get_rank()
        self.nranks = dist.get_world_size()
        if self.rank == SIGNAL_SRC and status_signal is None:
            raise ValueError(f"rank {SIGNAL_SRC} reads the engine's weights status: pass status_signal")
        self.status_signal = status_signal if self.rank == SIGNAL_SRC else None
        self.signal_group = (
            new_signal_group(
                timeout=signal_timeout,
                create_timeout=signal_create_timeout,
                transport=signal_transport,
                lookahead=signal_lookahead,
                initial=ModelWeightsStatus.NORMAL,
            )
            if self.nranks > 1
            else None
        )
        self.model = model
        self.weight_manager = DynamicWeightManager(model, status_signal=self.status_signal)
        self.steps = 0
        self.status = ModelWeightsStatus.NORMAL
        self.transitions: list[tuple[int, ModelWeightsStatus]] = []
        self.sync_latencies_ns: list[int] = []
        self.forward_passes = 0
        self._forward_input = forward_input

    def _broadcast_model_weights_signal(self, src: int, group: SignalGroup | None) -> int:
        """Return the status rank ``src`` read from the engine's shared memory, the same on every rank."""
        value = int(self.status_signal.value[0]) if self.rank == src else 0
        return broadcast_signal(value, src=src, group=group)

    def event_loop_step(self) -> ModelWeightsStatus:
        """Run one step: sync the status; clear or update the weights at the step a status takes effect, and run a
        forward pass on every NORMAL step.

        With lookahead a status stays in effect for several steps (rank 0 keeps publishing CLEARING until the
        clear it triggers has run), so clearing and updating happen once, on the transition; acting again would
        clear twice or update parameters that are no longer cleared. Returns the status every rank agreed on for
        this step.
        """
        started = time.perf_counter_ns()
        status = ModelWeightsStatus(self._broadcast_model_weights_signal(SIGNAL_SRC, self.signal_group))
        self.sync_latencies_ns.append(time.perf_counter_ns() - started)
        self.steps += 1
        changed = status != self.status
        if changed:
            self.transitions.append((self.steps, status))
            self.status = status
        if status == ModelWeightsStatus.NORMAL:
            self._forward()
        elif changed and status == ModelWeightsStatus.CLEARING:
            self.weight_manager.clear_parameters()
        elif changed and status == ModelWeightsStatus.UPDATING:
            self.weight_manager.update_parameters()
        return status

    def event_loop(self, max_steps: int, *, step_interval: float = 0.0) -> int:
        """Run ``max_steps`` steps, sleeping ``step_interval`` seconds after each; returns the steps run.

        Every rank must run the same number of steps, since each step is a collective.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if step_interval < 0:
            raise ValueError(f"step_interval must be >= 0 seconds, got {step_interval!r}")
        for _ in range(max_steps):
            self.event_loop_step()
            if step_interval:
                time.sleep(step_interval)
        return max_steps

    def _forward(self) -> None:
        if self._forward_input is None:
            return
        with paddle.no_grad():
            self.model(self._forward_input)
        self.forward_passes += 1
