"""The side-by-side signal-sync benchmarks behind ``fastdeploy-patch bench``.

Latency (the default): every rank times the same per-step status sync done each way in one run: upstream's
``broadcast_object_list`` on the default group (on GPU also the GPU-tensor broadcast), ``broadcast_signal`` on a
gloo signal group (``paddle.distributed.broadcast``), the gloo process group's own ``broadcast`` on a reused
buffer (the call ``broadcast_signal`` made before it used the public API), the gloo group with a timeout below
gloo's own limit (which adds a deadline thread), and ``broadcast_signal`` on a shared-memory signal group.

Jitter (``--jitter``): every rank runs a loop whose steps each do their own CPU work, drawn per rank and step, and
the loop time per step is compared with no sync, with lockstep syncs (gloo, shm) and with shm and a lookahead,
which lets a rank run a few steps ahead instead of paying the slowest rank's jitter every step.

Late src (``--src-late MS``, 2 ranks): the src sleeps MS milliseconds before each timed publish while the reader
already waits, on a shared-memory and on a gloo signal group, and, as the floor under both, on one bare futex word
(``FutexFloor``). The report gives the reader's wake latency (from the src's call to the reader's return, on the
host's one monotonic clock) at p50/p90/p99, its CPU share meanwhile, what the publishing call cost the src (on shm,
a futex wake when the reader sleeps) at p50 and p99, and the shm wake over the floor's.

In latency and jitter, each path runs its steps back to back, as a worker loop would, in ``ROUNDS`` rounds that
rotate through the paths, so that slow spells on a noisy machine spread over every path; the ranks meet at a barrier
before each round of each path. In late src, where each step already sleeps, the paths take turns step by step
(shm, gloo, floor, shm, ...): a host that wakes an idle CPU slower for a minute slows every path alike, and the
shm wake over the floor's compares wakes from the same minutes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fastdeploy_patch.status import ModelWeightsStatus

DEADLINE_TIMEOUT_S = 5.0
"""The timeout of the deadline row's gloo group: below gloo's fixed 30 s, so each broadcast goes through the
deadline thread."""

DEFAULT_WARMUP = 200

ROUNDS = 5
"""Turns each path's timed steps are split into; the turns rotate through the paths."""

PATH_LABELS = {
    "legacy": "legacy: broadcast_object_list, default group",
    "legacy_gpu": "legacy: GPU tensor broadcast + .numpy()",
    "gloo": "gloo: broadcast_signal (paddle.distributed.broadcast)",
    "gloo_direct": "gloo: process group's own broadcast, reused buffer",
    "gloo_deadline": f"gloo, {DEADLINE_TIMEOUT_S:g} s timeout (deadline thread)",
    "shm": "shm: broadcast_signal, shared memory",
}
"""What each measured latency path is, in the order they are reported."""

RATIOS = {
    "legacy_over_gloo": ("legacy", "gloo"),
    "gloo_over_shm": ("gloo", "shm"),
    "legacy_over_shm": ("legacy", "shm"),
}
"""The ratios the latency report gives, as (numerator path, denominator path)."""

JITTER_LOOKAHEAD = 4
"""The lookahead of the jitter benchmark's pipelined path: a status takes effect 4 steps after it is published."""

JITTER_WORK_US = (200, 400)
"""The CPU work of each step in the jitter benchmark, drawn uniformly from this range (inclusive) per rank and
step: the scale of a small-batch decode step's host-side work."""

JITTER_SEED = 0
"""Seeds each rank's draws (with its rank), so that every path and every run sees the same work."""

JITTER_LABELS = {
    "nosync": "no sync",
    "gloo": "gloo, lockstep",
    "shm": "shm, lockstep",
    "shm_lookahead": f"shm, lookahead {JITTER_LOOKAHEAD}",
}
"""What each jitter path is, in report order."""

LATE_LABELS = {
    "shm": "shm: broadcast_signal, shared memory",
    "gloo": "gloo: broadcast_signal (paddle.distributed.broadcast)",
    "futex_floor": "floor: bare futex wake on one shared word",
}
"""What the late-src benchmark runs, in report order: the transports, then the floor (where futex works)."""

FLOOR_TIMEOUT_S = 60.0
"""How long the floor's reader waits for one step before it gives up: far beyond any ``--src-late``. It sleeps all of
it in one ``FUTEX_WAIT``. With shorter sleeps of its own (1 s before), a gap near their length let the reader's
timeout end just before the publish (in 1 step of 5 at ``--src-late 1000``, measured here), so the floor timed a
reader that had just run instead of a wake from idle."""

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
    barrier: Callable[[], object] = lambda: None,
) -> dict[str, list[int]]:
    """Time ``iters`` calls of every path after ``warmup`` untimed ones, and return each path's durations in
    nanoseconds.

    Each path runs its calls back to back, as a worker loop would, in ``rounds`` turns that rotate through the
    paths, so that slow spells on a noisy machine spread over every path. ``barrier`` runs (untimed) before each
    path's warm-up and each turn, so that a turn does not start with one rank still finishing the previous one.
    Every rank must pass the same paths in the same order, since each call is a collective.
    """
    samples: dict[str, list[int]] = {name: [] for name in paths}
    for fn in paths.values():
        barrier()
        for _ in range(warmup):
            fn()
    for turn in range(rounds):
        count = iters // rounds + (1 if turn < iters % rounds else 0)
        for name, fn in paths.items():
            timed = samples[name]
            barrier()
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
    """On one rank: time each latency path for ``iters`` steps after ``warmup`` steps; returns
    ``{"rank", "samples_ns"}`` with each path's durations in nanoseconds."""
    import paddle
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group

    rank = dist.get_rank()
    # The signal groups are made once, before timing, as the worker makes its group at start.
    gloo = new_signal_group(transport="gloo")
    gloo_deadline = new_signal_group(transport="gloo", timeout=DEADLINE_TIMEOUT_S)
    shm = new_signal_group(transport="shm")

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
    paths["gloo"] = lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=gloo)
    paths["gloo_direct"] = direct_gloo_broadcast(gloo, rank)
    paths["gloo_deadline"] = lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=gloo_deadline)
    paths["shm"] = lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=shm)
    try:
        samples = measure(paths, iters, warmup, rounds=ROUNDS, barrier=dist.barrier)
    finally:
        for group in (gloo, gloo_deadline, shm):
            group.close()
    return {"rank": rank, "samples_ns": samples}


def direct_gloo_broadcast(group: Any, rank: int) -> Callable[[], int]:
    """The per-step call on the gloo process group itself, as ``broadcast_signal`` made it before it used
    ``paddle.distributed.broadcast``: a reused CPU int32 buffer, filled on rank 0, then
    ``process_group.broadcast(tensor, src_in_group, True)``."""
    import paddle

    tensor = paddle.full([1], _SIGNAL_VALUE, dtype="int32", device="cpu")
    process_group = group.paddle_group.process_group
    src_in_group = group.ranks.index(0)

    def call() -> int:
        if rank == 0:
            tensor.fill_(_SIGNAL_VALUE)
        process_group.broadcast(tensor, src_in_group, True)
        return int(tensor.item())

    return call


def busy_wait_us(microseconds: int, clock: Callable[[], int] = time.perf_counter_ns) -> None:
    """Keep the CPU busy for ``microseconds``: a stand-in for a step's host-side work."""
    end = clock() + microseconds * 1000
    while clock() < end:
        pass


def work_draws(rank: int, count: int, seed: int = JITTER_SEED) -> list[int]:
    """``count`` step costs in microseconds for ``rank``, uniform over ``JITTER_WORK_US``; the same for the same
    rank and seed, different between ranks."""
    low, high = JITTER_WORK_US
    return [int(us) for us in np.random.default_rng([seed, rank]).integers(low, high + 1, size=count)]


def jitter_step(draws: Sequence[int], sync: Callable[[], object], work: Callable[[int], None] = busy_wait_us):
    """One loop step per call: the next draw's CPU work, then ``sync``; the draws repeat when used up."""
    costs: Iterator[int] = _cycle(draws)

    def step() -> None:
        work(next(costs))
        sync()

    return step


def _cycle(values: Sequence[int]) -> Iterator[int]:
    while True:
        yield from values


def jitter_rank(iters: int, warmup: int = DEFAULT_WARMUP) -> dict:
    """On one rank: time ``iters`` loop steps (after ``warmup``) of per-step CPU work with each sync path;
    returns ``{"rank", "samples_ns", "work_us_mean"}`` with each path's step durations in nanoseconds."""
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, new_signal_group

    rank = dist.get_rank()
    gloo = new_signal_group(transport="gloo")
    shm = new_signal_group(transport="shm")
    pipelined = new_signal_group(transport="shm", lookahead=JITTER_LOOKAHEAD)
    # Every path works through the same draws, so that they differ only in how they sync.
    draws = work_draws(rank, iters + warmup)
    syncs: dict[str, Callable[[], object]] = {
        "nosync": lambda: None,
        "gloo": lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=gloo),
        "shm": lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=shm),
        "shm_lookahead": lambda: broadcast_signal(_SIGNAL_VALUE, src=0, group=pipelined),
    }
    paths = {name: jitter_step(draws, sync, busy_wait_us) for name, sync in syncs.items()}
    try:
        samples = measure(paths, iters, warmup, rounds=ROUNDS, barrier=dist.barrier)
    finally:
        for group in (gloo, shm, pipelined):
            group.close()
    return {"rank": rank, "samples_ns": samples, "work_us_mean": float(np.mean(draws))}


class FutexFloor:
    """The bare futex wake between 2 ranks, the floor under the shm transport's: one 32-bit word in a page both
    ranks map; the src stores the step's number there and calls ``FUTEX_WAKE``, the reader sleeps in ``FUTEX_WAIT``
    on it at once. It uses the transport's own futex calls (``futex``) and nothing else of it."""

    def __init__(self, futex: Any, page: mmap.mmap, *, src: bool) -> None:
        self._futex = futex
        self._page = page
        self._word = ctypes.c_uint32.from_buffer(page)
        self._address = ctypes.addressof(self._word)
        # The transport's own way to wake: its arguments made once.
        self._wake = futex.waker(self._address)
        self._src = src
        self._step = 0

    def call(self) -> None:
        """On the src: publish the next step and wake the reader. On the reader: return once the next step (or a
        later one) is published; ``TimeoutError`` after ``FLOOR_TIMEOUT_S``."""
        self._step += 1
        step = self._step
        if self._src:
            self._word.value = step
            self._wake()
            return
        deadline = time.monotonic() + FLOOR_TIMEOUT_S
        while (seen := self._word.value) < step:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the floor's src did not publish step {step} within {FLOOR_TIMEOUT_S:g} s")
            self._futex.wait(self._address, seen, left)

    def close(self) -> None:
        """Unmap the page."""
        del self._word
        self._page.close()


def shared_page(rank: int) -> mmap.mmap:
    """Collective over the world: one page of memory that every rank maps. It has no name anywhere (a memfd of
    rank 0, which the others open through ``/proc``), so no rank's death can leave it behind."""
    import paddle.distributed as dist

    box: list[str | None] = [None]
    if rank == 0:
        fd = os.memfd_create("fdp-bench-floor")
        os.ftruncate(fd, mmap.PAGESIZE)
        box[0] = f"/proc/{os.getpid()}/fd/{fd}"
    dist.broadcast_object_list(box, src=0)
    if rank != 0:
        fd = os.open(box[0], os.O_RDWR)
    try:
        return mmap.mmap(fd, mmap.PAGESIZE)
    finally:
        # Rank 0's descriptor is the others' way in: it stays open until every rank has its mapping.
        dist.barrier()
        os.close(fd)


def late_rank(iters: int, warmup: int = DEFAULT_WARMUP, late_ms: float = 2.0) -> dict:
    """On one of 2 ranks: ``iters`` broadcasts (after ``warmup`` back to back) per transport and on the futex floor,
    rank 0 sleeping ``late_ms`` before each timed publish. Returns ``{"rank", "stamps_ns", "publish_ns", "cpu_s",
    "wall_s", "wait", "floor"}``: per path when rank 0 called (rank 0) or the reader returned (the others), on
    ``time.perf_counter_ns`` (the host's monotonic clock, the same in every process), what each publish cost
    rank 0, this rank's CPU and wall time over the timed steps, how a shm reader sleeps, and why the floor could
    not run (None when it ran)."""
    import paddle.distributed as dist

    from fastdeploy_patch.signal_group import broadcast_signal, futex_support, new_signal_group, shm_reader_sleep

    rank = dist.get_rank()
    late_s = late_ms / 1000.0
    groups = {name: new_signal_group(transport=name) for name in ("shm", "gloo")}
    calls: dict[str, Callable[[], object]] = {
        name: lambda group=group: broadcast_signal(_SIGNAL_VALUE, src=0, group=group) for name, group in groups.items()
    }
    support = futex_support()
    floor = None
    if support.futex is not None:
        floor = FutexFloor(support.futex, shared_page(rank), src=rank == 0)
        calls["futex_floor"] = floor.call
    stamps: dict[str, list[int]] = {name: [] for name in calls}
    publish: dict[str, list[int]] = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    wall = dict.fromkeys(calls, 0.0)

    def timed_step(name: str) -> None:
        call = calls[name]
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        if rank == 0:
            time.sleep(late_s)
            called = time.perf_counter_ns()
            call()
            stamps[name].append(called)
            publish[name].append(time.perf_counter_ns() - called)
        else:
            call()
            stamps[name].append(time.perf_counter_ns())
        cpu[name] += time.process_time() - cpu_started
        wall[name] += time.perf_counter() - wall_started

    try:
        for call in calls.values():
            dist.barrier()
            # Back to back: a long gap costs only the timed steps.
            for _ in range(warmup):
                call()
        dist.barrier()
        # No barrier between the timed steps: a reader returns from one path's step and waits on the next path
        # while the src sleeps.
        for _ in range(iters):
            for name in calls:
                timed_step(name)
    finally:
        for group in groups.values():
            group.close()
        if floor is not None:
            floor.close()
    return {
        "rank": rank,
        "stamps_ns": stamps,
        "publish_ns": publish,
        "cpu_s": cpu,
        "wall_s": wall,
        "wait": list(shm_reader_sleep()),
        "floor": None if floor is not None else support.reason,
    }


def build_late_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, late_ms: float, paddle_version: str
) -> dict[str, Any]:
    """The late-src benchmark's figures per path (the transports, and the futex floor when it ran): the readers'
    wake latency (each reader's return minus the src's call, step by step) at p50/p90/p99 and its mean, the readers'
    CPU share in percent of a core over the timed steps, the src's publishing call at p50 and p99, and the shm wake
    over the floor's at p50 (None without a floor)."""
    src = next(r for r in results if r["rank"] == 0)
    readers = [r for r in results if r["rank"] != 0]
    paths = {}
    for name, label in LATE_LABELS.items():
        if name not in src["stamps_ns"]:
            continue
        wakes = [
            returned - called
            for reader in readers
            for returned, called in zip(reader["stamps_ns"][name], src["stamps_ns"][name], strict=True)
        ]
        cpu, wall = sum(r["cpu_s"][name] for r in readers), sum(r["wall_s"][name] for r in readers)
        paths[name] = {
            "label": label,
            "wake_p50_us": percentile_us(wakes, 50),
            "wake_p90_us": percentile_us(wakes, 90),
            "wake_p99_us": percentile_us(wakes, 99),
            "wake_mean_us": float(np.mean(wakes)) / 1000.0 if wakes else 0.0,
            "samples": len(wakes),
            "reader_cpu_pct": cpu / wall * 100.0 if wall else 0.0,
            "src_publish_p50_us": percentile_us(src["publish_ns"][name], 50),
            "src_publish_p99_us": percentile_us(src["publish_ns"][name], 99),
        }
    kind, detail = src["wait"]
    floor = paths.get("futex_floor")
    return {
        "mode": "src_late",
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "late_ms": late_ms,
        "paddle_version": paddle_version,
        "shm_reader_sleep": {"kind": kind, "detail": detail},
        "paths": paths,
        "shm_wake_over_floor_p50": _ratio(paths["shm"]["wake_p50_us"], floor["wake_p50_us"]) if floor else None,
        "no_floor_because": src["floor"],
    }


_LATE_COLUMNS = (
    ("wake p50", lambda p: f"{p['wake_p50_us']:.1f}"),
    ("wake p90", lambda p: f"{p['wake_p90_us']:.1f}"),
    ("wake p99", lambda p: f"{p['wake_p99_us']:.1f}"),
    ("reader cpu", lambda p: f"{p['reader_cpu_pct']:.1f}%"),
    ("pub p50", lambda p: f"{p['src_publish_p50_us']:.1f}"),
    ("pub p99", lambda p: f"{p['src_publish_p99_us']:.1f}"),
)


def format_late_report(report: Mapping[str, Any]) -> str:
    """The human-readable late-src table: wake latency (us), the readers' CPU share and the src's publish (us) per
    path, then the shm wake over the floor's."""
    sleep = report["shm_reader_sleep"]
    ratio = report["shm_wake_over_floor_p50"]
    over_floor = (
        f"shm wake / bare futex wake: {_times(ratio)} at p50"
        if report["no_floor_because"] is None
        else f"no bare futex floor: {report['no_floor_because']}"
    )
    return "\n".join(
        [
            f"src late by {report['late_ms']:g} ms before each timed publish, {report['nranks']} ranks, "
            f"{report['iters']} steps after {report['warmup']} warm-up, Paddle {report['paddle_version']}; wake = the "
            "reader's return after the src's call, in us",
            *_table(report["paths"], _LATE_COLUMNS),
            over_floor,
            f"a waiting shm reader sleeps in: {sleep['kind']} ({sleep['detail']})",
        ]
    )


def pooled(results: Sequence[dict], order: Iterable[str] = PATH_LABELS) -> dict[str, list[int]]:
    """Every rank's samples of each path in one list, paths in ``order`` (those the ranks measured)."""
    names = [name for name in order if name in results[0]["samples_ns"]]
    return {name: [ns for r in results for ns in r["samples_ns"][name]] for name in names}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _paths(results: Sequence[dict], labels: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "label": labels[name],
            **summarize(values),
            "per_rank": {str(r["rank"]): summarize(r["samples_ns"][name]) for r in results},
        }
        for name, values in pooled(results, labels).items()
    }


def _difference(more: Mapping[str, float], less: Mapping[str, float]) -> dict[str, float]:
    return {"p50": more["p50_us"] - less["p50_us"], "mean": more["mean_us"] - less["mean_us"]}


def build_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, backend: str, paddle_version: str
) -> dict[str, Any]:
    """The latency benchmark's figures: each path's p50/p99/mean over all ranks' samples (and per rank), the
    ratios legacy/gloo, gloo/shm and legacy/shm at p50 and at the mean, what the public
    ``paddle.distributed.broadcast`` costs per step over the process group's own call, and what the deadline
    thread adds."""
    paths = _paths(results, PATH_LABELS)
    return {
        "mode": "latency",
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "backend": backend,
        "paddle_version": paddle_version,
        "paths": paths,
        "ratios": {
            name: {
                "p50": _ratio(paths[top]["p50_us"], paths[bottom]["p50_us"]),
                "mean": _ratio(paths[top]["mean_us"], paths[bottom]["mean_us"]),
            }
            for name, (top, bottom) in RATIOS.items()
        },
        "public_broadcast_cost_us": _difference(paths["gloo"], paths["gloo_direct"]),
        "deadline_thread_cost_us": _difference(paths["gloo_deadline"], paths["gloo"]),
    }


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _table(
    paths: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, Callable[[Mapping], str]]]
) -> list[str]:
    width = max(len(p["label"]) for p in paths.values())
    lines = ["  ".join(["path".ljust(width), *(f"{title:>9}" for title, _ in columns)])]
    for p in paths.values():
        lines.append("  ".join([p["label"].ljust(width), *(f"{cell(p):>9}" for _, cell in columns)]))
    return lines


_LATENCY_COLUMNS = (
    ("p50 us", lambda p: f"{p['p50_us']:.1f}"),
    ("p99 us", lambda p: f"{p['p99_us']:.1f}"),
    ("mean us", lambda p: f"{p['mean_us']:.1f}"),
)


def format_report(report: Mapping[str, Any]) -> str:
    """The human-readable latency table, the ratios, and the costs of the public broadcast and the deadline
    thread."""
    lines = [
        f"signal sync per step, {report['nranks']} ranks ({report['backend']}), {report['iters']} steps after "
        f"{report['warmup']} warm-up, Paddle {report['paddle_version']}; all ranks' samples pooled",
        *_table(report["paths"], _LATENCY_COLUMNS),
    ]
    for name, ratio in report["ratios"].items():
        top, bottom = RATIOS[name]
        lines.append(f"{top} / {bottom}: {_times(ratio['p50'])} at p50, {_times(ratio['mean'])} at the mean")
    public, deadline = report["public_broadcast_cost_us"], report["deadline_thread_cost_us"]
    lines.append(
        f"paddle.distributed.broadcast over the direct process-group call: {public['p50']:+.1f} us per step at p50, "
        f"{public['mean']:+.1f} us at the mean"
    )
    lines.append(
        f"deadline thread cost: {deadline['p50']:+.1f} us per step at p50, {deadline['mean']:+.1f} us at the mean"
    )
    return "\n".join(lines)


def _percent_over(value: float, base: float) -> float | None:
    return (value - base) / base * 100.0 if base else None


def build_jitter_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, paddle_version: str
) -> dict[str, Any]:
    """The jitter benchmark's figures: each path's loop time per step (the mean; p50/p99 too) over all ranks,
    its overhead over no sync in percent, and the lookahead path's overhead as a fraction of lockstep shm's."""
    paths = _paths(results, JITTER_LABELS)
    base = paths["nosync"]["mean_us"]
    for path in paths.values():
        path["overhead_pct"] = _percent_over(path["mean_us"], base)
    lockstep, pipelined = paths["shm"]["overhead_pct"], paths["shm_lookahead"]["overhead_pct"]
    return {
        "mode": "jitter",
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "paddle_version": paddle_version,
        "work_us": list(JITTER_WORK_US),
        "work_us_mean": float(np.mean([r["work_us_mean"] for r in results])),
        "seed": JITTER_SEED,
        "lookahead": JITTER_LOOKAHEAD,
        "paths": paths,
        # Only meaningful when lockstep costs something: a zero or negative overhead leaves nothing to compare.
        "lookahead_over_lockstep_shm": pipelined / lockstep if lockstep and lockstep > 0 else None,
    }


def _overhead(path: Mapping[str, Any]) -> str:
    pct = path["overhead_pct"]
    return "n/a" if pct is None else f"{pct:+.1f}%"


_JITTER_COLUMNS = (
    ("step us", lambda p: f"{p['mean_us']:.1f}"),
    ("p50 us", lambda p: f"{p['p50_us']:.1f}"),
    ("p99 us", lambda p: f"{p['p99_us']:.1f}"),
    ("overhead", _overhead),
)


def format_jitter_report(report: Mapping[str, Any]) -> str:
    """The human-readable jitter table: loop time per step and overhead over no sync, per path."""
    low, high = report["work_us"]
    share = report["lookahead_over_lockstep_shm"]
    return "\n".join(
        [
            f"loop time per step with {low}-{high} us of CPU work per rank and step (mean "
            f"{report['work_us_mean']:.1f} us), {report['nranks']} ranks, {report['iters']} steps after "
            f"{report['warmup']} warm-up, Paddle {report['paddle_version']}; all ranks' steps pooled",
            *_table(report["paths"], _JITTER_COLUMNS),
            f"lookahead {report['lookahead']} overhead / lockstep shm overhead: "
            + ("n/a (lockstep shm cost nothing)" if share is None else f"{share:.2f}"),
        ]
    )


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
    """Save each path's distribution of per-step times (an empirical CDF, log-scaled time) to ``path``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in pooled(results, report["paths"]).items():
        ordered = np.sort(np.asarray(values, dtype=np.float64)) / 1000.0
        fraction = np.arange(1, len(ordered) + 1) / len(ordered)
        summary = report["paths"][name]
        ax.step(ordered, fraction, where="post", label=f"{summary['label']} (p50 {summary['p50_us']:.0f} us)")
    ax.set_xscale("log")
    what = "loop step" if report["mode"] == "jitter" else "signal sync per step"
    ax.set_xlabel(f"{what} (us, log scale)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"{report['nranks']} ranks, {report['iters']} steps, Paddle {report['paddle_version']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
