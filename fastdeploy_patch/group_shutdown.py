"""A full process-group shutdown that tolerates backends without ``shutdown`` (gloo)."""

from __future__ import annotations

import paddle.distributed as dist
from paddle.distributed import collective

from fastdeploy_patch.paddle_internals import paddle_private

# Paddle registers the group made by init_parallel_env under id 0 and never shuts it down.
_DEFAULT_GROUP_ID = 0


def shutdown_process_groups() -> list[str]:
    """Shut down every registered process group that can be shut down, like Paddle's no-argument
    ``shutdown_process_group()`` but safe when gloo groups exist.

    Skips the default group and every group whose backend has no ``shutdown`` (gloo), and groups already shut
    down, so it never raises ``AttributeError`` and calling it twice is harmless. Each group goes through
    Paddle's own per-group ``shutdown_process_group``, so ``paddle.distributed.restart_process_group()``
    restarts exactly what this shut down. Paddle's group registry is never modified: the signal group stays
    registered and usable. An error from one group's shutdown propagates; the groups before it stay shut down.

    Returns the names of the groups shut down by this call, in registry order.
    """
    registry = paddle_private(collective, "_get_group_map_by_name")()
    already_down = paddle_private(collective, "_get_shutdown_group_map_by_name")()
    shut: list[str] = []
    # Iterate over a copy: a shutdown must not be able to change what we walk.
    for name, group in list(registry.items()):
        # A group this rank is not in has no process group; getattr(None, ...) skips it like a gloo group.
        if group.id == _DEFAULT_GROUP_ID or name in already_down:
            continue
        if not callable(getattr(group.process_group, "shutdown", None)):
            continue
        dist.shutdown_process_group(group)
        shut.append(name)
    return shut
