"""The latency benchmark (``fastdeploy-patch bench``, the default): every rank times the same per-step status sync
done each way in one run.

The paths: upstream's ``broadcast_object_list`` on the default group (on GPU also the GPU-tensor broadcast),
``broadcast_signal`` on a gloo signal group, the same with a timeout below gloo's own limit (which adds a deadline
thread), and ``broadcast_signal`` on a shared-memory signal group.
"""

from __future__ import annotations

from collections.abc import Callable

from fastdeploy_patch.cli.bench.timing import ROUNDS, SIGNAL_VALUE, measure

DEADLINE_TIMEOUT_S = 5.0
"""The timeout of the deadline row's gloo group: below gloo's fixed 30 s, so each broadcast goes through the
deadline thread."""

LABELS = {
    "legacy": "legacy: broadcast_object_list, default group",
    "legacy_gpu": "legacy: GPU tensor broadcast + .numpy()",
    "gloo": "gloo: broadcast_signal (paddle.distributed.broadcast)",
    "gloo_deadline": f"gloo, {DEADLINE_TIMEOUT_S:g} s timeout (deadline thread)",
    "shm": "shm: broadcast_signal, shared memory",
}
"""What each measured path is, in the order they are reported."""


def gpu_available(min_devices: int = 1) -> bool:
    """Whether Paddle was built with CUDA and at least ``min_devices`` GPUs are visible."""
    import paddle

    return bool(paddle.is_compiled_with_cuda()) and paddle.device.cuda.device_count() >= min_devices


def latency_rank(iters: int, warmup: int) -> dict:
    """On one rank: time each path for ``iters`` steps after ``warmup`` steps; returns ``{"rank", "samples_ns"}``
    with each path's durations in nanoseconds."""
    import paddle
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group

    rank = dist.get_rank()
    # The signal groups are made once, before timing, as the worker makes its group at start.
    gloo = new_signal_group(transport="gloo")
    gloo_deadline = new_signal_group(transport="gloo", timeout=DEADLINE_TIMEOUT_S)
    shm = new_signal_group(transport="shm")

    def legacy() -> object:
        box = [SIGNAL_VALUE if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def legacy_gpu() -> object:
        # Upstream's per-step code on NCCL: a device tensor, a kernel, then a host copy that waits for the GPU.
        tensor = paddle.full([1], SIGNAL_VALUE, dtype=paddle.int32)
        dist.broadcast(tensor, src=0)
        return tensor.numpy()[0]

    paths: dict[str, Callable[[], object]] = {"legacy": legacy}
    if gpu_available():
        paths["legacy_gpu"] = legacy_gpu
    paths["gloo"] = lambda: broadcast_signal(SIGNAL_VALUE, src=0, group=gloo)
    paths["gloo_deadline"] = lambda: broadcast_signal(SIGNAL_VALUE, src=0, group=gloo_deadline)
    paths["shm"] = lambda: broadcast_signal(SIGNAL_VALUE, src=0, group=shm)
    try:
        samples = measure(paths, iters, warmup, rounds=ROUNDS, barrier=dist.barrier)
    finally:
        for group in (gloo, gloo_deadline, shm):
            group.close()
    return {"rank": rank, "samples_ns": samples}
