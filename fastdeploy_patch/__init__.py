"""fastdeploy_patch: the model-weights status synced over a CPU (gloo) signal group, and a process-group
shutdown that tolerates gloo.

Paddle is an extra, not a hard dependency (its CPU and GPU wheels conflict): install
``fastdeploy-patch[cpu]`` or ``fastdeploy-patch[gpu]``.
"""

from __future__ import annotations

# Before Paddle is imported: the command and every rank import it through here.
import fastdeploy_patch.paddle_warnings  # noqa: F401 - installs a warning filter
from fastdeploy_patch.status import ModelWeightsStatus

try:
    import paddle  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "fastdeploy_patch needs PaddlePaddle: pip install 'fastdeploy-patch[cpu]' (or '[gpu]' on a CUDA machine)"
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
