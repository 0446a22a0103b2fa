"""Release model weights (and communication groups) while the trainer updates them, then reload them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist

from fastdeploy_patch.group_shutdown import shutdown_process_groups
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.paddle_internals import paddle_private
from fastdeploy_patch.status import ModelWeightsStatus


def storage_place(place: Any) -> Any:
    """The place object ``DenseTensor.set`` accepts for a tensor's ``place`` (Paddle's generic ``Place``): a
    ``CPUPlace`` or the ``CUDAPlace`` of the same device.

    Raises ``RuntimeError`` for any other kind of place: a reload there is untested, so it must not be guessed.
    """
    if place.is_cpu_place():
        return paddle.CPUPlace()
    if place.is_gpu_place():
        return paddle.CUDAPlace(place.gpu_device_id())
    raise RuntimeError(f"cannot release weights stored on {place}: only CPU and CUDA places can be reloaded")


@dataclass(frozen=True)
class HostCopy:
    """A parameter's values on the host and the place its storage came from."""

    values: np.ndarray
    place: Any

    @classmethod
    def of(cls, param: paddle.Tensor) -> HostCopy:
        """Copy ``param``'s values to the host and record its place (its storage must be initialised)."""
        return cls(param.numpy().copy(), storage_place(param.place))

    def restore(self, param: paddle.Tensor) -> None:
        """Give ``param`` new storage on the recorded place, holding these values.

        Writes into the parameter's own dense tensor (as Paddle's static-graph ``Variable.set_value`` does), so it
        keeps its name, ``persistable`` and ``stop_gradient``. ``Tensor.copy_`` into released storage would take the
        source's place and flags instead, and the eager ``Tensor.set_value`` allocates on the current device. A
        bfloat16 parameter's host copy is uint16, which ``set`` reads back as bfloat16.
        """
        param.get_tensor().set(self.values, self.place)


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
        # Stands in for the trainer's next weights: the host copies taken when the weights are released.
        self._reload_source: dict[str, HostCopy] = {}
        self._groups_down: list[str] = []
        self.parameters_released = 0
        self.parameters_restored = 0
        self.groups_shut_down = 0
        self.groups_restarted = 0

    def clear_parameters(self) -> None:
        """Release every parameter's storage (after taking its host copy), free the CUDA cache, wait for all
        ranks, shut down the communication groups that support it, and set CLEARED. Does nothing when already
        cleared.

        Safe to call again after a failure (say the shutdown raised): parameters already released keep the host
        copy taken the first time. Raises ``RuntimeError`` before releasing anything when a parameter lives on
        a place other than the CPU or a CUDA device.
        """
        if self.status == ModelWeightsStatus.CLEARED:
            return
        is_initialized = paddle_private(paddle.Tensor, "_is_initialized")
        clear_data = paddle_private(paddle.Tensor, "_clear_data")
        # A copy of a released parameter would be empty, and reloading it would leave the weight empty.
        held = {name: param for name, param in self.model.named_parameters() if is_initialized(param)}
        # Every copy first: a place that cannot be reloaded stops the clear before anything is released.
        self._reload_source.update({name: HostCopy.of(param) for name, param in held.items()})
        for param in held.values():
            clear_data(param)
            self.parameters_released += 1
        if paddle.is_compiled_with_cuda():
            # Released blocks stay in Paddle's caching allocator until emptied; the point is to free the GPU.
            paddle.device.cuda.empty_cache()
        if dist.get_world_size() > 1:
            dist.barrier()
        self._groups_down = shutdown_process_groups()
        self.groups_shut_down += len(self._groups_down)
        self._set_status(ModelWeightsStatus.CLEARED)

    def update_parameters(self) -> None:
        """Restart the groups shut down by ``clear_parameters``, reload every parameter onto the place it was
        released from, and set NORMAL.

        Raises ``RuntimeError`` when the parameters were not cleared first, or, before restarting anything,
        naming a parameter that has no host copy (it held no data when the weights were released).
        """
        if self.status != ModelWeightsStatus.CLEARED:
            raise RuntimeError(f"update_parameters() needs cleared parameters, but the status is {self.status.name}")
        params = dict(self.model.named_parameters())
        missing = [name for name in params if name not in self._reload_source]
        if missing:
            raise RuntimeError(
                f"cannot reload parameter {missing[0]!r}: it held no data when the weights were released, so no "
                f"copy of it was taken (parameters without a copy: {missing})"
            )
        dist.restart_process_group()
        self.groups_restarted += len(self._groups_down)
        for name, param in params.items():
            self._reload_source.pop(name).restore(param)
            self.parameters_restored += 1
        self._set_status(ModelWeightsStatus.NORMAL)

    def _set_status(self, status: ModelWeightsStatus) -> None:
        self.status = status
        if self._status_signal is not None:
            self._status_signal.value[0] = status
