"""GPU runners only (paddlepaddle-gpu): an NCCL default group beside the gloo signal group (2+ GPUs), and
weights released and reloaded on a GPU (1+ GPU).

Signal broadcasts must launch no device kernel and copy nothing between device and host, while the legacy
path (a GPU tensor broadcast on the default group, then ``.numpy()``) does; the safe shutdown must really
stop a non-default NCCL group, and restart must bring it back. Weights cleared on a GPU must come back on that
GPU, with every attribute they had.
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from fastdeploy_patch.rl.dynamic_weight_manager import DynamicWeightManager
from fastdeploy_patch.testing.plugin import PaddleRanks
from tests.distributed import rank_fns

GPUS_NEEDED = 2
STEPS = 20


def gpu_skip_reason(gpus_needed: int = GPUS_NEEDED, what: str = "an NCCL default group") -> str | None:
    """Why a test needing ``gpus_needed`` GPUs (for ``what``) cannot run on this machine, or None when it can."""
    if not paddle.is_compiled_with_cuda():
        return f"needs paddlepaddle-gpu and {gpus_needed}+ GPUs: the installed Paddle {paddle.__version__} is CPU-only"
    count = paddle.device.cuda.device_count()
    if count < gpus_needed:
        return f"needs {gpus_needed}+ GPUs for {what}: this machine has {count}"
    return None


_NCCL_SKIP = gpu_skip_reason()
_ONE_GPU_SKIP = gpu_skip_reason(1, "weights on a GPU")
pytestmark = pytest.mark.gpu


@pytest.mark.paddle_gpus(GPUS_NEEDED)
@pytest.mark.skipif(_NCCL_SKIP is not None, reason=str(_NCCL_SKIP))
def test_signal_broadcasts_launch_no_gpu_work_and_safe_shutdown_stops_and_restarts_nccl(
    paddle_ranks: PaddleRanks,
) -> None:
    nranks = GPUS_NEEDED
    # A world of its own: the call shuts down and restarts the NCCL group, and profiles the device.
    reports = paddle_ranks.run(rank_fns.gpu_checks, nranks, kwargs={"steps": STEPS}, devices="gpu")

    for report in reports:
        rank = report["rank"]
        assert report["signal"]["host"] > STEPS, f"rank {rank}: the profile saw nothing"
        assert report["signal"]["kernels"] == 0, f"rank {rank}: signal broadcasts launched kernels"
        assert report["signal"]["memcpys"] == 0, f"rank {rank}: signal broadcasts copied device memory"
        assert report["legacy"]["kernels"] > 0, f"rank {rank}: the legacy path launched no kernel"
        assert report["legacy"]["memcpys"] > 0, f"rank {rank}: the legacy path copied nothing"
        assert report["shut"] == [report["nccl_group"]]
        assert report["nccl_group"] in report["down_after_shutdown"]
        assert report["down_after_restart"] == []
        assert report["sum_before"] == report["sum_after"] == sum(range(1, nranks + 1))
        assert report["signal_after"] == 77


def _attributes(model: paddle.nn.Layer) -> dict[str, tuple]:
    return {
        name: (str(param.place), param.dtype, list(param.shape), param.persistable, param.stop_gradient, param.name)
        for name, param in model.named_parameters()
    }


@pytest.mark.skipif(_ONE_GPU_SKIP is not None, reason=str(_ONE_GPU_SKIP))
def test_weights_cleared_on_a_gpu_come_back_on_that_gpu_with_every_attribute() -> None:
    # One process and no process group: the barrier is skipped and there is no group to shut down or restart.
    previous = paddle.device.get_device()
    gpu = paddle.device.cuda.device_count() - 1
    try:
        paddle.set_device(f"gpu:{gpu}")
        paddle.seed(5)
        model = paddle.nn.Sequential(paddle.nn.Linear(256, 512), paddle.nn.Linear(512, 8))
        model[1].bias.stop_gradient = True
        x = paddle.rand([4, 256])
        expected = model(x).numpy()
        before = _attributes(model)
        assert all(place == f"Place(gpu:{gpu})" for place, *_ in before.values())
        allocated = paddle.device.cuda.memory_allocated(gpu)

        manager = DynamicWeightManager(model)
        manager.clear_parameters()
        assert paddle.device.cuda.memory_allocated(gpu) < allocated
        # A reload that allocated on the current device (as Tensor.set_value does) would now land on the CPU.
        paddle.set_device("cpu")
        manager.update_parameters()

        assert _attributes(model) == before
        paddle.set_device(f"gpu:{gpu}")
        assert np.array_equal(model(x).numpy(), expected)
    finally:
        paddle.set_device(previous)
