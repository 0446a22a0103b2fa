"""GPU runners only (paddlepaddle-gpu, at least 2 GPUs): an NCCL default group beside the gloo signal group.

Signal broadcasts must launch no device kernel and copy nothing between device and host, while the legacy
path (a GPU tensor broadcast on the default group, then ``.numpy()``) does; the safe shutdown must really
stop a non-default NCCL group, and restart must bring it back.
"""

from __future__ import annotations

import paddle
import pytest

from tests.distributed import rank_fns
from tests.distributed.harness import run_ranks_or_fail

GPUS_NEEDED = 2
STEPS = 20


def gpu_skip_reason() -> str | None:
    """Why the GPU tests cannot run on this machine, or None when they can."""
    if not paddle.is_compiled_with_cuda():
        return f"needs paddlepaddle-gpu and {GPUS_NEEDED}+ GPUs: the installed Paddle {paddle.__version__} is CPU-only"
    count = paddle.device.cuda.device_count()
    if count < GPUS_NEEDED:
        return f"needs {GPUS_NEEDED}+ GPUs for an NCCL default group: this machine has {count}"
    return None


_SKIP_REASON = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))]


def test_signal_broadcasts_launch_no_gpu_work_and_safe_shutdown_stops_and_restarts_nccl() -> None:
    nranks = GPUS_NEEDED
    reports = run_ranks_or_fail(rank_fns.gpu_checks, nranks, kwargs={"steps": STEPS}, backend="nccl")

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
