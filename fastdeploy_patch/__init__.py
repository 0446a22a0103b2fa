"""fastdeploy_patch: the model-weights status synced over a CPU signal group (shared memory between ranks on one
host, a CPU tensor on gloo between hosts), and a process-group shutdown that tolerates gloo.

This package root holds the patch and its public API, nothing else: ``signal_group/``, ``group_shutdown``,
``worker/``, ``rl/``, ``status``, ``ipc_signal``, ``paddle_internals`` (the one door to Paddle's private API),
``paddle_warnings`` and ``procfs`` (every read of ``/proc``). Two subpackages stand beside it: ``cli/`` (the
``fastdeploy-patch`` command) and ``testing/`` (the multi-rank harness). They may import the patch; the patch never
imports them.

Paddle is not a hard dependency (its CPU and GPU wheels conflict): install ``fastdeploy-patch[cpu]``, or
Paddle 3.3's GPU wheel from Paddle's own package index (see the README). Importing this package checks that Paddle
is installed but imports it only when a public name that needs it is first used, and it installs no warning
filter: what Paddle prints on import is the importing program's business.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fastdeploy_patch.status import ModelWeightsStatus

PADDLE_MISSING = (
    "fastdeploy_patch needs PaddlePaddle 3.3. CPU: pip install 'fastdeploy-patch[cpu]'. GPU: PyPI has no Paddle 3 "
    "GPU wheel; install one from Paddle's own index for your CUDA version (cu126, cu129, ...: see "
    "https://www.paddlepaddle.org.cn/install/quick), for example: python -m pip install "
    "paddlepaddle-gpu==3.3.1 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/"
)

# The check finds Paddle without importing it: importing it here would run Paddle's import-time warnings before
# the command (or a rank) could install its filter.
try:
    _paddle_spec = importlib.util.find_spec("paddle")
except ImportError as exc:
    raise ImportError(PADDLE_MISSING, name="paddle") from exc
if _paddle_spec is None:
    raise ImportError(PADDLE_MISSING, name="paddle")

_PUBLIC_MODULES = {
    "GLOO_OP_TIMEOUT_S": "fastdeploy_patch.signal_group",
    "SignalGroup": "fastdeploy_patch.signal_group",
    "SignalGroupError": "fastdeploy_patch.signal_group",
    "broadcast_signal": "fastdeploy_patch.signal_group",
    "new_signal_group": "fastdeploy_patch.signal_group",
    "shutdown_process_groups": "fastdeploy_patch.group_shutdown",
}

if TYPE_CHECKING:
    from fastdeploy_patch.group_shutdown import shutdown_process_groups
    from fastdeploy_patch.signal_group import (
        GLOO_OP_TIMEOUT_S,
        SignalGroup,
        SignalGroupError,
        broadcast_signal,
        new_signal_group,
    )


def __getattr__(name: str) -> Any:
    """The public names that need Paddle, imported on first use; a Paddle that is installed but cannot load
    raises the same ``ImportError`` as a missing one."""
    module_name = _PUBLIC_MODULES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastdeploy_patch' has no attribute {name!r}")
    try:
        import paddle  # noqa: F401
    except ImportError as exc:
        raise ImportError(PADDLE_MISSING, name="paddle") from exc
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


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
