"""Release model weights (and communication groups) while the trainer updates them, then reload them."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist

from fastdeploy_patch.group_shutdown import shutdown_process_groups
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.paddle_internals import paddle_private
from fastdeploy_patch.status import ModelWeightsStatus


class DynamicWeightManager:
    """Clears and reloads the parameters of ``model`` on this rank.

    Every rank calls ``clear_parameters``/``update_parameters`` at the same step (the worker's status sync makes
    sure of that), because both contain collectives. Only the rank given ``status_signal`` writes the new
    status back for the engine: a second writer could overwrite the engine's next request.
    """

    def __init__(self, model: paddle.nn.Layer, *, status_signal: StatusSignal | None = None) -> None:
        self.model = model
        self.status = ModelWeightsStatus.NORMAL
        self._status_signal = status_signal
        # Stands in for the trainer's next weights: a host copy taken when the weights are released.
        self._reload_source: dict[str, np.ndarray] = {}
        self._groups_down: list[str] = []
        self.parameters_released = 0
        self.parameters_restored = 0
        self.groups_shut_down = 0
        self.groups_restarted = 0

    def clear_parameters(self) -> None:
        """Release every parameter's storage, wait for all ranks, shut down the communication groups that
        support it, and set CLEARED. Does nothing when already cleared."""
        if self.status == ModelWeightsStatus.CLEARED:
            return
        clear_data = paddle_private(paddle.Tensor, "_clear_data")
        for name, param in self.model.named_parameters():
            self._reload_source[name] = param.numpy().copy()
            clear_data(param)
            self.parameters_released += 1
        if dist.get_world_size() > 1:
            dist.barrier()
        self._groups_down = shutdown_process_groups()
        self.groups_shut_down += len(self._groups_down)
        self._set_status(ModelWeightsStatus.CLEARED)

    def update_parameters(self) -> None:
        """Restart the groups shut down by ``clear_parameters``, reload every parameter, and set NORMAL.

        Raises ``RuntimeError`` when the parameters were not cleared first.
        """
        if self.status != ModelWeightsStatus.CLEARED:
            raise RuntimeError(f"update_parameters() needs cleared parameters, but the status is {self.status.name}")
        dist.restart_process_group()
        self.groups_restarted += len(self._groups_down)
        for name, param in self.model.named_parameters():
            param.copy_(paddle.to_tensor(self._reload_source.pop(name), place=paddle.CPUPlace()), False)
            self.parameters_restored += 1
        self._set_status(ModelWeightsStatus.NORMAL)

    def _set_status(self, status: ModelWeightsStatus) -> None:
        self.status = status
        if self._status_signal is not None:
            self._status_signal.value[0] = status
