"""The side-by-side signal-sync latency benchmark behind ``fastdeploy-patch bench``.

Every rank times the same per-step status sync done three (on GPU, four) ways: upstream's
``broadcast_object_list`` on the default group, the patch's CPU tensor on the gloo signal group, and the same with
a timeout below gloo's own limit, which adds a deadline thread. Each path runs its steps back to back, as a worker
loop would, in ``ROUNDS`` rounds that rotate through the paths, so that slow spells on a noisy machine spread over
every path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fastdeploy_patch.status import ModelWeightsStatus

DEADLINE_TIMEOUT_S = 5.0
"""The signal-group timeout of the third path: below gloo's fixed 30 s, so each broadcast goes through the
deadline thread."""

DEFAULT_WARMUP = 200

ROUNDS = 5
"""Turns each path's timed steps are split into; the turns rotate through the paths."""

PATH_LABELS = {
    "legacy": "legacy: broadcast_object_list, default group",
    "legacy_gpu": "legacy: GPU tensor broadcast + .numpy()",
    "patch": "patch: CPU tensor, gloo signal group",
    "patch_deadline": f"patch, {DEADLINE_TIMEOUT_S:g} s timeout (deadline thread)",
}
"""What each measured path is, in the order they are reported."""

_SIGNAL_VALUE = int(ModelWeightsStatus.NORMAL)


def percentile_us(samples_ns: Sequence[int], q: float) -> float:
    """The ``q``-th percentile (linear interpolation) of ``samples_ns``, in microseconds; 0.0 when empty."""
    if not len(samples_ns):
        return 0.0
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q)) / 1000.0


def summarize(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99 and mean of ``samples_ns`` in microseconds, and the sample count."""
    mean = float(np.mean(samples_ns)) / 1000.0 if len(samples_ns) else 0.0
    return {
        "p50_us": percentile_us(samples_ns, 50),
        "p99_us": percentile_us(samples_ns, 99),
        "mean_us": mean,
        "samples": len(samples_ns),
    }


def measure(
    paths: Mapping[str, Callable[[], object]],
    iters: int,
    warmup: int,
    rounds: int = 1,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> dict[str, list[int]]:
    """Time ``iters`` calls of every path after ``warmup`` untimed ones, and return each path's durations in
    nanoseconds.

    Each path runs its calls back to back, as a worker loop would, in ``rounds`` turns that rotate through the
    paths, so that slow spells on a noisy machine spread over every path. Every rank must pass the same paths in
    the same order, since each call is a collective.
    """
    samples: dict[str, list[int]] = {name: [] for name in paths}
    for fn in paths.values():
        for _ in range(warmup):
            fn()
    for turn in range(rounds):
        count = iters // rounds + (1 if turn < iters % rounds else 0)
        for name, fn in paths.items():
            timed = samples[name]
            for _ in range(count):
                started = clock()
                fn()
                timed.append(clock() - started)
    return samples


def gpu_available(min_devices: int = 1) -> bool:
    """Whether Paddle was built with CUDA and at least ``min_devices`` GPUs are visible."""
    import paddle

    return bool(paddle.is_compiled_with_cuda()) and paddle.device.cuda.device_count() >= min_devices


def pick_backend(nranks: int) -> str:
    """The default group's backend for the ranks: NCCL when there is a GPU per rank (as in production), else
    gloo."""
    return "nccl" if gpu_available(nranks) else "gloo"


def bench_rank(iters: int, warmup: int = DEFAULT_WARMUP) -> dict:
    """On one rank: time each path for ``iters`` steps after ``warmup`` steps; returns ``{"rank", "samples_ns"}``
    with each path's durations in nanoseconds."""
    import paddle
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group

    rank = dist.get_rank()
    # The signal groups are made once, before timing, as the worker makes its group at start.
    group = new_signal_group()
    deadline_group = new_signal_group(timeout=DEADLINE_TIMEOUT_S)

    def legacy() -> object:
        box = [_SIGNAL_VALUE if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def legacy_gpu() -> object:
        # Upstream's per-step code on NCCL: a device tensor, a kernel, then a host copy that waits for the GPU.
        tensor = paddle.full([1], _SIGNAL_VALUE, dtype="int32")
        dist.broadcast(tensor, src=0)
        return tensor.numpy()[0]

    paths: dict[str, Callable[[], object]] = {"legacy": legacy}
    if gpu_available():
        paths["legacy_gpu"] = legacy_gpu
    paths["patch"] = lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=group)
    paths["patch_deadline"] = lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=deadline_group)
    return {"rank": rank, "samples_ns": measure(paths, iters, warmup, rounds=ROUNDS)}


def pooled(results: Sequence[dict]) -> dict[str, list[int]]:
    """Every rank's samples of each path in one list, paths in report order."""
    names = [name for name in PATH_LABELS if name in results[0]["samples_ns"]]
    return {name: [ns for r in results for ns in r["samples_ns"][name]] for name in names}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def build_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, backend: str, paddle_version: str
) -> dict[str, Any]:
    """The benchmark's figures: each path's p50/p99/mean over all ranks' samples (and per rank), the ratio
    legacy / patch at p50 and at the mean, and what the deadline thread adds per step."""
    samples = pooled(results)
    paths = {
        name: {
            "label": PATH_LABELS[name],
            **summarize(values),
            "per_rank": {str(r["rank"]): summarize(r["samples_ns"][name]) for r in results},
        }
        for name, values in samples.items()
    }
    legacy, patch, deadline = paths["legacy"], paths["patch"], paths["patch_deadline"]
    return {
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "backend": backend,
        "paddle_version": paddle_version,
        "paths": paths,
        "ratio_legacy_over_patch": {
            "p50": _ratio(legacy["p50_us"], patch["p50_us"]),
            "mean": _ratio(legacy["mean_us"], patch["mean_us"]),
        },
        "deadline_thread_cost_us": {
            "p50": deadline["p50_us"] - patch["p50_us"],
            "mean": deadline["mean_us"] - patch["mean_us"],
        },
    }


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def format_report(report: Mapping[str, Any]) -> str:
    """The human-readable benchmark table, the ratio and the deadline thread's cost."""
    paths = report["paths"]
    width = max(len(p["label"]) for p in paths.values())
    lines = [
        f"signal sync per step, {report['nranks']} ranks ({report['backend']}), {report['iters']} steps after "
        f"{report['warmup']} warm-up, Paddle {report['paddle_version']}; all ranks' samples pooled",
        f"{'path'.ljust(width)}  {'p50 us':>9}  {'p99 us':>9}  {'mean us':>9}",
    ]
    for p in paths.values():
        lines.append(f"{p['label'].ljust(width)}  {p['p50_us']:9.1f}  {p['p99_us']:9.1f}  {p['mean_us']:9.1f}")
    ratio = report["ratio_legacy_over_patch"]
    cost = report["deadline_thread_cost_us"]
    lines.append(f"legacy / patch: {_times(ratio['p50'])} at p50, {_times(ratio['mean'])} at the mean")
    lines.append(f"deadline thread cost: {cost['p50']:+.1f} us per step at p50, {cost['mean']:+.1f} us at the mean")
    return "\n".join(lines)


def load_pyplot() -> Any:
    """Import matplotlib's pyplot with a file-only backend; ``RuntimeError`` with the install hint when the
    ``plot`` extra is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib, an optional extra: pip install 'fastdeploy-patch[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(results: Sequence[dict], report: Mapping[str, Any], path: str, plt: Any) -> None:
    """Save each path's latency distribution (an empirical CDF, log-scaled time) to ``path``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in pooled(results).items():
        ordered = np.sort(np.asarray(values, dtype=np.float64)) / 1000.0
        fraction = np.arange(1, len(ordered) + 1) / len(ordered)
        ax.step(
            ordered,
            fraction,
            where="post",
            label=f"{PATH_LABELS[name]} (p50 {report['paths'][name]['p50_us']:.0f} us)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("signal sync per step (us, log scale)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"{report['nranks']} ranks, {report['iters']} steps, Paddle {report['paddle_version']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
