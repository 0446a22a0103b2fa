"""fastdeploy_patch: the model-weights status synced over a CPU signal group (shared memory between ranks on one
host, a CPU tensor on gloo between hosts), and a process-group shutdown that tolerates gloo.

Paddle is not a hard dependency (its CPU and GPU wheels conflict): install ``fastdeploy-patch[cpu]``, or
Paddle 3.3's GPU wheel from Paddle's own package index (see the README).
"""

from __future__ import annotations

# Before Paddle is imported: the command and every rank import it through here.
import fastdeploy_patch.paddle_warnings  # noqa: F401 - installs a warning filter
from fastdeploy_patch.status import ModelWeightsStatus

try:
    import paddle  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "fastdeploy_patch needs PaddlePaddle 3.3. CPU: pip install 'fastdeploy-patch[cpu]'. GPU: PyPI has no Paddle 3 "
        "GPU wheel; install one from Paddle's own index for your CUDA version (cu126, cu129, ...: see "
        "https://www.paddlepaddle.org.cn/install/quick), for example: python -m pip install "
        "paddlepaddle-gpu==3.3.1 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/"
    ) from exc

from fastdeploy_patch.group_shutdown import shutdown_process_groups
from fastdeploy_patch.signal_group import (
    GLOO_OP_TIMEOUT_S,
    SignalGroup,
    SignalGroupError,
    broadcast_signal,
    new_signal_group,
)

__all__ = [
    "GLOO_OP_TIMEOUT_S",
    "ModelWeightsStatus",
    "SignalGroup",
    "SignalGroupError",
    "broadcast_signal",
    "new_signal_group",
    "shutdown_process_groups",
]
__version__ = "0.1.0"
