"""The benchmark's measurement, statistics, report and plot, with collectives and matplotlib faked."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import numpy as np
import paddle
import pytest

from fastdeploy_patch import signal_group
from fastdeploy_patch.cli import bench
from fastdeploy_patch.cli.bench import (
    DEADLINE_TIMEOUT_S,
    JITTER_LABELS,
    JITTER_LOOKAHEAD,
    JITTER_WORK_US,
    PATH_LABELS,
    build_jitter_report,
    build_report,
    format_jitter_report,
    format_late_report,
    format_report,
    gpu_available,
    jitter_step,
    load_pyplot,
    measure,
    percentile_us,
    pick_backend,
    plot_report,
    pooled,
    summarize,
    work_draws,
)
from fastdeploy_patch.signal_group import futex

# --- statistics -----------------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_and_converts_ns_to_us() -> None:
    samples = [4000, 1000, 3000, 2000]
    assert percentile_us(samples, 50) == pytest.approx(2.5)
    assert percentile_us(samples, 99) == pytest.approx(3.97)
    assert percentile_us(samples, 0) == pytest.approx(1.0)


def test_percentile_of_no_samples_is_zero() -> None:
    assert percentile_us([], 50) == 0.0


def test_summarize_gives_p50_p99_mean_in_us_and_the_count() -> None:
    assert summarize([1000, 2000, 6000]) == {
        "p50_us": pytest.approx(2.0),
        "p99_us": pytest.approx(5.92),
        "mean_us": pytest.approx(3.0),
        "samples": 3,
    }


def test_summarize_of_no_samples_is_all_zero() -> None:
    assert summarize([]) == {"p50_us": 0.0, "p99_us": 0.0, "mean_us": 0.0, "samples": 0}


# --- measure --------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Paths that log each call, and a clock that advances by a path-specific cost during the call."""

    now: int = 0
    calls: list[str] = field(default_factory=list)

    def path(self, name: str, cost_ns: int):
        def call() -> None:
            self.calls.append(name)
            self.now += cost_ns

        return call

    def clock(self) -> int:
        self.now += 1  # reading the clock costs a tick, which lands outside the timed call
        return self.now


def test_measure_warms_up_untimed_then_times_each_path_back_to_back() -> None:
    rec = Recorder()
    paths = {"a": rec.path("a", 100), "b": rec.path("b", 7)}
    samples = measure(paths, iters=3, warmup=2, clock=rec.clock)
    assert rec.calls == ["a", "a", "b", "b", "a", "a", "a", "b", "b", "b"]
    # Each duration is the path's cost plus the one clock tick of the second reading.
    assert samples == {"a": [101, 101, 101], "b": [8, 8, 8]}


def test_measure_spreads_the_iterations_over_rounds_that_rotate_through_the_paths() -> None:
    rec = Recorder()
    samples = measure({"a": rec.path("a", 5), "b": rec.path("b", 5)}, iters=5, warmup=0, rounds=2, clock=rec.clock)
    # 5 iterations in 2 rounds: 3, then 2.
    assert rec.calls == ["a", "a", "a", "b", "b", "b", "a", "a", "b", "b"]
    assert [len(samples["a"]), len(samples["b"])] == [5, 5]


def test_measure_meets_the_barrier_before_each_warm_up_and_each_turn_untimed() -> None:
    rec = Recorder()
    paths = {"a": rec.path("a", 5), "b": rec.path("b", 5)}
    samples = measure(paths, iters=3, warmup=1, rounds=2, clock=rec.clock, barrier=lambda: rec.calls.append("|"))
    assert "".join(rec.calls) == "|a|b" + "|aa|bb" + "|a|b"
    assert samples == {"a": [6, 6, 6], "b": [6, 6, 6]}


def test_measure_uses_the_monotonic_nanosecond_clock_by_default() -> None:
    samples = measure({"a": lambda: None}, iters=2, warmup=0)
    assert len(samples["a"]) == 2 and all(isinstance(ns, int) and ns >= 0 for ns in samples["a"])


# --- backend and GPU detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "devices", "min_devices", "expected"),
    [(False, 8, 1, False), (True, 0, 1, False), (True, 1, 1, True), (True, 1, 2, False), (True, 2, 2, True)],
)
def test_gpu_available_needs_cuda_and_enough_devices(cuda: bool, devices: int, min_devices: int, expected: bool):
    with (
        mock.patch.object(paddle, "is_compiled_with_cuda", return_value=cuda),
        mock.patch.object(paddle.device.cuda, "device_count", return_value=devices),
    ):
        assert gpu_available(min_devices) is expected


@pytest.mark.parametrize(("available", "backend"), [(True, "nccl"), (False, "gloo")])
def test_pick_backend_is_nccl_only_with_a_gpu_per_rank(available: bool, backend: str) -> None:
    with mock.patch.object(bench, "gpu_available", return_value=available) as probe:
        assert pick_backend(4) == backend
    probe.assert_called_once_with(4)


# --- bench_rank and jitter_rank ------------------------------------------------------------------------


@dataclass
class FakeProcessGroup:
    """The gloo process group under a signal group: records each direct broadcast."""

    calls: list[tuple[int, int, bool]] = field(default_factory=list)

    def broadcast(self, tensor: paddle.Tensor, src: int, sync_op: bool) -> None:
        self.calls.append((int(tensor.item()), src, sync_op))


@dataclass
class FakeSignalGroup:
    kwargs: dict
    number: int
    ranks: list[int] = field(default_factory=lambda: [0, 1])
    closed: bool = False

    def __post_init__(self) -> None:
        self.paddle_group = SimpleNamespace(process_group=FakeProcessGroup())

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeCollectives:
    """The distributed calls the benchmark ranks make, recorded with the group each one used."""

    rank: int = 0
    object_lists: list[tuple[list, int]] = field(default_factory=list)
    tensors: list[tuple[int, int, str]] = field(default_factory=list)
    signals: list[tuple[int, int, int]] = field(default_factory=list)
    groups: list[FakeSignalGroup] = field(default_factory=list)
    barriers: int = 0

    def new_signal_group(self, **kwargs: object) -> FakeSignalGroup:
        self.groups.append(FakeSignalGroup(kwargs, len(self.groups) + 1))
        return self.groups[-1]

    def broadcast_object_list(self, box: list, src: int) -> None:
        self.object_lists.append((list(box), src))
        box[0] = 0

    def broadcast(self, tensor: paddle.Tensor, src: int) -> None:
        self.tensors.append((int(tensor.item()), src, str(tensor.dtype)))

    def broadcast_signal(self, value: int, src: int, group: FakeSignalGroup) -> int:
        self.signals.append((value, src, group.number))
        return value

    def barrier(self) -> None:
        self.barriers += 1


@pytest.fixture
def fakes() -> Iterator[FakeCollectives]:
    fake = FakeCollectives()
    with (
        mock.patch("paddle.distributed.get_rank", side_effect=lambda: fake.rank),
        mock.patch("paddle.distributed.broadcast_object_list", side_effect=fake.broadcast_object_list),
        mock.patch("paddle.distributed.broadcast", side_effect=fake.broadcast),
        mock.patch("paddle.distributed.barrier", fake.barrier),
        mock.patch.object(signal_group, "new_signal_group", side_effect=fake.new_signal_group),
        mock.patch.object(signal_group, "broadcast_signal", side_effect=fake.broadcast_signal),
        mock.patch.object(bench, "busy_wait_us", side_effect=lambda us: None),
    ):
        yield fake


def test_bench_rank_times_every_path_on_the_right_groups(fakes: FakeCollectives) -> None:
    with mock.patch.object(bench, "gpu_available", return_value=False):
        result = bench.bench_rank(iters=3, warmup=2)
    assert result["rank"] == 0
    assert list(result["samples_ns"]) == ["legacy", "gloo", "gloo_direct", "gloo_deadline", "shm"]
    assert all(len(samples) == 3 for samples in result["samples_ns"].values())
    # Made once before timing: gloo, gloo with a timeout below its own limit, shared memory; closed after.
    assert [g.kwargs for g in fakes.groups] == [
        {"transport": "gloo"},
        {"transport": "gloo", "timeout": DEADLINE_TIMEOUT_S},
        {"transport": "shm"},
    ]
    assert all(g.closed for g in fakes.groups)
    # The legacy path sends the status object from rank 0 over the default group (no group argument).
    assert fakes.object_lists == [([0], 0)] * 5
    # Warm-up path by path, then the 3 timed steps spread over rounds: one step of each path per round.
    gloo, deadline, shm = (0, 0, 1), (0, 0, 2), (0, 0, 3)
    assert fakes.signals == [gloo] * 2 + [deadline] * 2 + [shm] * 2 + [gloo, deadline, shm] * 3
    # The direct path is the gloo group's own process group, src 0 as its group rank, synchronous.
    assert fakes.groups[0].paddle_group.process_group.calls == [(0, 0, True)] * 5
    assert fakes.tensors == []
    # One barrier before each path's warm-up and before each path's turn in each of the 5 rounds.
    assert fakes.barriers == 5 + 5 * 5


def test_bench_rank_receives_the_legacy_object_on_other_ranks(fakes: FakeCollectives) -> None:
    fakes.rank = 1
    with mock.patch.object(bench, "gpu_available", return_value=False):
        result = bench.bench_rank(iters=1, warmup=0)
    assert result["rank"] == 1
    assert fakes.object_lists == [([None], 0)]


def test_bench_rank_adds_the_gpu_tensor_path_when_a_gpu_is_visible(fakes: FakeCollectives) -> None:
    with mock.patch.object(bench, "gpu_available", return_value=True):
        result = bench.bench_rank(iters=2, warmup=1)
    assert list(result["samples_ns"]) == ["legacy", "legacy_gpu", "gloo", "gloo_direct", "gloo_deadline", "shm"]
    # A fresh int32 tensor broadcast from rank 0 over the default group, every step.
    assert fakes.tensors == [(0, 0, "paddle.int32")] * 3


def test_bench_rank_closes_its_groups_when_measuring_fails(fakes: FakeCollectives) -> None:
    with (
        mock.patch.object(bench, "gpu_available", return_value=False),
        mock.patch.object(bench, "measure", side_effect=TimeoutError("stuck")),
        pytest.raises(TimeoutError, match="stuck"),
    ):
        bench.bench_rank(iters=1, warmup=0)
    assert len(fakes.groups) == 3 and all(g.closed for g in fakes.groups)


def test_the_paths_return_what_they_received(fakes: FakeCollectives) -> None:
    captured: dict = {}

    def keep_paths(paths, iters, warmup, rounds, barrier):
        captured.update(paths)
        return {}

    with mock.patch.object(bench, "gpu_available", return_value=True), mock.patch.object(bench, "measure", keep_paths):
        bench.bench_rank(iters=1, warmup=0)
    value = captured["legacy_gpu"]()
    assert isinstance(value, np.integer) and value == 0
    assert [captured[name]() for name in ("legacy", "gloo", "gloo_direct", "gloo_deadline", "shm")] == [0] * 5


@pytest.mark.parametrize(("rank", "filled"), [(0, 0), (1, 77)])
def test_the_direct_gloo_call_fills_the_reused_buffer_on_rank_0_only(rank: int, filled: int) -> None:
    group = FakeSignalGroup({}, 1, ranks=[0, 3])
    broadcast = bench.direct_gloo_broadcast(group, rank)
    calls = group.paddle_group.process_group.calls
    for _ in range(2):
        if rank != 0:
            # What another rank receives lands in the buffer; rank 0's fill must not touch it here.
            calls.clear()
            group.paddle_group.process_group.broadcast = lambda tensor, src, sync: tensor.fill_(77)
        assert broadcast() == filled
    if rank == 0:
        assert calls == [(0, 0, True), (0, 0, True)]


def test_the_direct_gloo_call_names_src_by_its_rank_in_the_group() -> None:
    group = FakeSignalGroup({}, 1, ranks=[2, 0])
    bench.direct_gloo_broadcast(group, 0)()
    assert group.paddle_group.process_group.calls == [(0, 1, True)]


def test_busy_wait_spins_until_the_clock_passes_the_end() -> None:
    ticks = iter([1000, 1500, 2999, 3000, 9999])
    reads: list[int] = []

    def clock() -> int:
        reads.append(next(ticks))
        return reads[-1]

    bench.busy_wait_us(2, clock=clock)
    assert reads == [1000, 1500, 2999, 3000]


def test_busy_wait_really_takes_the_time() -> None:
    import time

    started = time.perf_counter_ns()
    bench.busy_wait_us(300)
    assert time.perf_counter_ns() - started >= 300_000


def test_work_draws_are_per_rank_reproducible_and_in_range() -> None:
    assert JITTER_WORK_US == (200, 400) and bench.JITTER_SEED == 0
    draws = work_draws(0, 2000)
    assert len(draws) == 2000 and all(isinstance(us, int) for us in draws)
    assert min(draws) == 200 and max(draws) == 400
    assert draws == work_draws(0, 2000)
    assert draws != work_draws(1, 2000)
    assert draws != work_draws(0, 2000, seed=1)


def test_a_jitter_step_works_through_the_draws_then_syncs_and_cycles() -> None:
    log: list[object] = []
    step = jitter_step([3, 1, 2], lambda: log.append("sync"), work=log.append)
    for _ in range(4):
        step()
    assert log == [3, "sync", 1, "sync", 2, "sync", 3, "sync"]


def test_jitter_rank_runs_the_same_work_with_each_sync_path(fakes: FakeCollectives) -> None:
    fakes.rank = 1
    worked: list[int] = []
    with mock.patch.object(bench, "busy_wait_us", side_effect=worked.append):
        result = bench.jitter_rank(iters=4, warmup=2)
    assert result["rank"] == 1
    assert list(result["samples_ns"]) == ["nosync", "gloo", "shm", "shm_lookahead"]
    assert all(len(samples) == 4 for samples in result["samples_ns"].values())
    assert [g.kwargs for g in fakes.groups] == [
        {"transport": "gloo"},
        {"transport": "shm"},
        {"transport": "shm", "lookahead": JITTER_LOOKAHEAD},
    ]
    assert JITTER_LOOKAHEAD == 4
    assert all(g.closed for g in fakes.groups)
    draws = work_draws(1, 6)
    assert result["work_us_mean"] == pytest.approx(sum(draws) / 6)
    # Every path goes through this rank's same draws: the warm-up's 2, then the timed 4.
    assert len(worked) == 4 * 6
    assert sorted(worked) == sorted(draws * 4)
    # nosync sends nothing; the others send rank 0's status on their own group, 6 times each.
    assert sorted(fakes.signals) == sorted([(0, 0, 1)] * 6 + [(0, 0, 2)] * 6 + [(0, 0, 3)] * 6)
    assert fakes.barriers == 4 + 4 * 5


def test_jitter_rank_closes_its_groups_when_measuring_fails(fakes: FakeCollectives) -> None:
    with mock.patch.object(bench, "measure", side_effect=RuntimeError("lost")), pytest.raises(RuntimeError):
        bench.jitter_rank(iters=1, warmup=0)
    assert len(fakes.groups) == 3 and all(g.closed for g in fakes.groups)


# --- late src ----------------------------------------------------------------------------------------------


@dataclass
class LateClock:
    """time.sleep, perf_counter_ns, perf_counter and process_time for late_rank: sleeping advances the clock,
    each broadcast takes ``call_ns``, and process time runs at a tenth of wall time."""

    now_ns: int = 10**9
    call_ns: int = 40_000
    sleeps: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_ns += round(seconds * 1e9)

    def perf_counter_ns(self) -> int:
        return self.now_ns

    def perf_counter(self) -> float:
        return self.now_ns / 1e9

    def process_time(self) -> float:
        return self.now_ns / 1e10


@dataclass
class FakeFutex:
    """The futex calls for the floor: records wakes, and each wait stands for the src publishing the next step."""

    wakes: list[int] = field(default_factory=list)
    waits: list[tuple[int, int, float]] = field(default_factory=list)
    publishes: bool = True

    def waker(self, address: int) -> Callable[[], int]:
        return lambda: self.wakes.append(address) or 1

    def wait(self, address: int, expected: int, seconds: float) -> str:
        self.waits.append((address, expected, seconds))
        if self.publishes:
            ctypes.c_uint32.from_address(address).value = expected + 1
        return "woken"


@pytest.fixture
def late_clock(fakes: FakeCollectives) -> Iterator[LateClock]:
    clock = LateClock()
    real = fakes.broadcast_signal

    def timed_broadcast(value: int, src: int, group: FakeSignalGroup) -> int:
        clock.now_ns += clock.call_ns
        return real(value, src, group)

    with (
        mock.patch.object(bench.time, "sleep", clock.sleep),
        mock.patch.object(bench.time, "perf_counter_ns", clock.perf_counter_ns),
        mock.patch.object(bench.time, "perf_counter", clock.perf_counter),
        mock.patch.object(bench.time, "process_time", clock.process_time),
        mock.patch.object(signal_group, "broadcast_signal", side_effect=timed_broadcast),
        mock.patch.object(signal_group, "shm_reader_sleep", return_value=("futex", "SYS_futex 202 on x86_64")),
        mock.patch.object(signal_group, "futex_support", return_value=futex.Support(None, "futex is Linux-only")),
    ):
        yield clock


@pytest.fixture
def floor_futex(late_clock: LateClock) -> Iterator[FakeFutex]:
    """Futex works: the floor runs on a private page, through a fake futex."""
    fake = FakeFutex()
    pages: list[mmap.mmap] = []

    def page(rank: int) -> mmap.mmap:
        pages.append(mmap.mmap(-1, mmap.PAGESIZE))
        return pages[-1]

    with (
        mock.patch.object(signal_group, "futex_support", return_value=futex.Support(fake, "fake")),
        mock.patch.object(bench, "shared_page", side_effect=page),
    ):
        yield fake
    assert all(p.closed for p in pages)


@pytest.mark.parametrize("rank", [0, 1])
def test_late_rank_times_each_transport_and_the_floor_with_the_src_sleeping_before_each_timed_publish(
    fakes: FakeCollectives, late_clock: LateClock, floor_futex: FakeFutex, rank: int
) -> None:
    fakes.rank = rank
    result = bench.late_rank(iters=6, warmup=2, late_ms=2.0)
    assert [g.kwargs for g in fakes.groups] == [{"transport": "shm"}, {"transport": "gloo"}]
    assert all(g.closed for g in fakes.groups)
    # A barrier before each path's warm-up and one before the timed steps, which take turns path by path.
    assert fakes.barriers == 3 + 1
    # Rank 0 publishes; the reader passes None through the fake as whatever it sends.
    shm, gloo = (0, 0, 1), (0, 0, 2)
    assert fakes.signals == [shm] * 2 + [gloo] * 2 + [shm, gloo] * 6
    # Warm-up steps run back to back: only the 3 paths' 6 timed steps sleep.
    assert late_clock.sleeps == ([0.002] * 18 if rank == 0 else [])
    assert result["rank"] == rank and result["wait"] == ["futex", "SYS_futex 202 on x86_64"]
    assert result["floor"] is None
    assert [len(result["stamps_ns"][name]) for name in ("shm", "gloo", "futex_floor")] == [6, 6, 6]
    if rank == 0:
        # The src stamps its call, before the broadcast, and times the broadcast itself; 8 floor publishes, 8 wakes.
        assert result["publish_ns"] == {"shm": [40_000] * 6, "gloo": [40_000] * 6, "futex_floor": [0] * 6}
        # Between two shm calls: a gloo step and a floor step, each after its own sleep.
        assert np.diff(result["stamps_ns"]["shm"]).tolist() == [3 * 2_000_000 + 2 * 40_000] * 5
        assert len(floor_futex.wakes) == 8 and floor_futex.waits == []
    else:
        # A reader stamps its return, after the broadcast, and never sleeps or times a publish.
        assert result["publish_ns"] == {"shm": [], "gloo": [], "futex_floor": []}
        assert result["stamps_ns"]["shm"][0] == 10**9 + 4 * 40_000 + 40_000
        assert [expected for _, expected, _ in floor_futex.waits] == list(range(8))
        assert floor_futex.wakes == []
    wall = 6 * (40_000 + (2_000_000 if rank == 0 else 0)) / 1e9
    assert result["wall_s"] == pytest.approx({"shm": wall, "gloo": wall, "futex_floor": wall - 6 * 40_000 / 1e9})
    assert result["cpu_s"]["shm"] == pytest.approx(wall / 10)


def test_late_rank_without_futex_runs_no_floor_and_says_why(fakes: FakeCollectives, late_clock: LateClock) -> None:
    result = bench.late_rank(iters=5, warmup=0, late_ms=1.0)
    assert list(result["stamps_ns"]) == ["shm", "gloo"]
    assert result["floor"] == "futex is Linux-only"
    assert fakes.barriers == 2 + 1


def test_late_rank_closes_its_groups_and_the_floor_when_a_broadcast_fails(
    fakes: FakeCollectives, late_clock: LateClock, floor_futex: FakeFutex
) -> None:
    with (
        mock.patch.object(signal_group, "broadcast_signal", side_effect=TimeoutError("stuck")),
        pytest.raises(TimeoutError, match="stuck"),
    ):
        bench.late_rank(iters=1, warmup=0)
    assert len(fakes.groups) == 2 and all(g.closed for g in fakes.groups)


def test_the_floors_src_stores_the_step_and_wakes_the_word() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    fake = FakeFutex()
    floor = bench.FutexFloor(fake, page, src=True)
    address = ctypes.addressof(ctypes.c_uint32.from_buffer(page))
    floor.call()
    floor.call()
    assert ctypes.c_uint32.from_address(address).value == 2 and fake.wakes == [address, address]
    floor.close()
    assert page.closed


def test_the_floors_reader_sleeps_on_the_word_until_its_step_or_a_later_one_is_published() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    word = ctypes.c_uint32.from_buffer(page)
    fake = FakeFutex()
    floor = bench.FutexFloor(fake, page, src=False)
    # One sleep for all that is left of the step's timeout: no timeout of its own ends near the publish.
    with mock.patch.object(bench.time, "monotonic", mock.Mock(side_effect=[100.0, 100.25])):
        floor.call()
    assert [(expected, seconds) for _, expected, seconds in fake.waits] == [(0, bench.FLOOR_TIMEOUT_S - 0.25)]
    # The src ran two steps ahead: the next two calls return without sleeping.
    word.value = 3
    floor.call()
    floor.call()
    assert len(fake.waits) == 1
    del word
    floor.close()


def test_the_floors_reader_gives_up_after_its_timeout() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    fake = FakeFutex(publishes=False)
    floor = bench.FutexFloor(fake, page, src=False)
    # A wait that returned without the step (a signal, a spurious wake) sleeps again for what is left; at the
    # deadline exactly, it gives up.
    clock = mock.Mock(side_effect=[0.0, 1.0, bench.FLOOR_TIMEOUT_S])
    with mock.patch.object(bench.time, "monotonic", clock), pytest.raises(TimeoutError) as err:
        floor.call()
    assert str(err.value) == "the floor's src did not publish step 1 within 60 s"
    assert [seconds for _, _, seconds in fake.waits] == [bench.FLOOR_TIMEOUT_S - 1.0]
    floor.close()


def test_a_shared_page_is_one_memory_for_every_rank_and_leaves_no_descriptor() -> None:
    """Both ranks in this process: rank 0's barrier is where rank 1 maps the page, through rank 0's descriptor."""
    boxes: list[list] = []
    pages: dict[int, mmap.mmap] = {}

    def broadcast_object_list(box: list, src: int) -> None:
        if boxes:
            box[0] = boxes[0][0]
        boxes.append(box)

    def barrier() -> None:
        if 1 not in pages and len(boxes) == 1:
            pages[1] = bench.shared_page(1)

    fds_before = set(os.listdir("/proc/self/fd"))
    with (
        mock.patch("paddle.distributed.broadcast_object_list", side_effect=broadcast_object_list),
        mock.patch("paddle.distributed.barrier", side_effect=barrier),
    ):
        pages[0] = bench.shared_page(0)
    assert boxes[0][0].startswith(f"/proc/{os.getpid()}/fd/")
    assert len(pages[0]) == len(pages[1]) == mmap.PAGESIZE
    pages[0][:4] = b"ping"
    assert pages[1][:4] == b"ping"
    for page in pages.values():
        page.close()
    assert set(os.listdir("/proc/self/fd")) == fds_before


def _late_results(floor: bool = True) -> list[dict]:
    src = {
        "rank": 0,
        "stamps_ns": {"shm": [0, 10_000_000, 20_000_000, 30_000_000], "gloo": [0, 10_000_000, 20_000_000, 30_000_000]},
        "publish_ns": {"shm": [1000, 2000, 3000, 4000], "gloo": [100_000] * 4},
        "cpu_s": {"shm": 0.001, "gloo": 0.001},
        "wall_s": {"shm": 0.04, "gloo": 0.04},
        "wait": ["futex", "SYS_futex 202 on x86_64"],
        "floor": None if floor else "futex is Linux-only",
    }
    reader = {
        "rank": 1,
        # shm wakes 10, 20, 30, 40 us after each call; gloo 100 .. 400 us.
        "stamps_ns": {
            "shm": [10_000, 10_020_000, 20_030_000, 30_040_000],
            "gloo": [100_000, 10_200_000, 20_300_000, 30_400_000],
        },
        "publish_ns": {"shm": [], "gloo": []},
        "cpu_s": {"shm": 0.002, "gloo": 0.004},
        "wall_s": {"shm": 0.04, "gloo": 0.04},
        "wait": ["futex", "SYS_futex 202 on x86_64"],
        "floor": src["floor"],
    }
    if floor:
        # The bare futex wakes 5, 10, 15, 20 us after each call.
        src["stamps_ns"]["futex_floor"] = [0, 10_000_000, 20_000_000, 30_000_000]
        src["publish_ns"]["futex_floor"] = [500] * 4
        src["cpu_s"]["futex_floor"], src["wall_s"]["futex_floor"] = 0.001, 0.04
        reader["stamps_ns"]["futex_floor"] = [5_000, 10_010_000, 20_015_000, 30_020_000]
        reader["publish_ns"]["futex_floor"] = []
        reader["cpu_s"]["futex_floor"], reader["wall_s"]["futex_floor"] = 0.0004, 0.04
    return [reader, src]


def test_build_late_report_pairs_each_readers_return_with_the_srcs_call() -> None:
    report = bench.build_late_report(_late_results(), nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3")
    assert {key: report[key] for key in ("mode", "nranks", "iters", "warmup", "late_ms", "paddle_version")} == {
        "mode": "src_late",
        "nranks": 2,
        "iters": 4,
        "warmup": 1,
        "late_ms": 10.0,
        "paddle_version": "3",
    }
    assert report["shm_reader_sleep"] == {"kind": "futex", "detail": "SYS_futex 202 on x86_64"}
    shm, gloo, floor = report["paths"]["shm"], report["paths"]["gloo"], report["paths"]["futex_floor"]
    assert list(report["paths"]) == ["shm", "gloo", "futex_floor"]
    assert shm == pytest.approx(
        {
            "label": "shm: broadcast_signal, shared memory",
            "wake_p50_us": 25.0,
            "wake_p90_us": 37.0,
            "wake_p99_us": 39.7,
            "wake_mean_us": 25.0,
            "samples": 4,
            "reader_cpu_pct": 5.0,
            "src_publish_p50_us": 2.5,
            "src_publish_p99_us": 3.97,
        }
    )
    assert (gloo["wake_p50_us"], gloo["reader_cpu_pct"], gloo["src_publish_p50_us"]) == pytest.approx(
        (250.0, 10.0, 100.0)
    )
    assert floor["label"] == "floor: bare futex wake on one shared word"
    assert (floor["wake_p50_us"], floor["reader_cpu_pct"], floor["src_publish_p99_us"]) == pytest.approx(
        (12.5, 1.0, 0.5)
    )
    assert report["shm_wake_over_floor_p50"] == pytest.approx(2.0) and report["no_floor_because"] is None


def test_a_late_report_without_a_floor_says_why_and_gives_no_ratio() -> None:
    report = bench.build_late_report(
        _late_results(floor=False), nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3"
    )
    assert list(report["paths"]) == ["shm", "gloo"]
    assert report["shm_wake_over_floor_p50"] is None and report["no_floor_because"] == "futex is Linux-only"
    assert format_late_report(report).splitlines()[-2] == "no bare futex floor: futex is Linux-only"


def test_a_late_report_without_samples_gives_zeros_instead_of_dividing_by_zero() -> None:
    empty = [
        {
            "rank": r,
            "stamps_ns": {"shm": [], "gloo": [], "futex_floor": []},
            "publish_ns": {"shm": [], "gloo": [], "futex_floor": []},
            "cpu_s": {"shm": 0.0, "gloo": 0.0, "futex_floor": 0.0},
            "wall_s": {"shm": 0.0, "gloo": 0.0, "futex_floor": 0.0},
            "wait": ["capped sleep", "why"],
            "floor": None,
        }
        for r in (0, 1)
    ]
    report = bench.build_late_report(empty, nranks=2, iters=0, warmup=0, late_ms=1.0, paddle_version="3")
    assert report["paths"]["shm"]["wake_mean_us"] == 0.0 and report["paths"]["shm"]["reader_cpu_pct"] == 0.0
    assert report["shm_wake_over_floor_p50"] is None


def test_a_src_that_timed_fewer_steps_than_a_reader_is_an_error() -> None:
    results = _late_results()
    results[1]["stamps_ns"]["shm"].pop()
    with pytest.raises(ValueError):
        bench.build_late_report(results, nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3")


def test_format_late_report_shows_wake_percentiles_cpu_and_publish_per_path_and_the_ratio_to_the_floor() -> None:
    report = bench.build_late_report(_late_results(), nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3")
    lines = format_late_report(report).splitlines()
    assert lines[0] == (
        "src late by 10 ms before each timed publish, 2 ranks, 4 steps after 1 warm-up, Paddle 3; wake = the "
        "reader's return after the src's call, in us"
    )
    assert lines[1].split() == [
        *("path", "wake", "p50", "wake", "p90", "wake", "p99", "reader", "cpu", "pub", "p50", "pub", "p99"),
    ]
    assert lines[2].split()[-6:] == ["25.0", "37.0", "39.7", "5.0%", "2.5", "4.0"]
    assert lines[3].split()[-6:] == ["250.0", "370.0", "397.0", "10.0%", "100.0", "100.0"]
    assert lines[2].startswith("shm: broadcast_signal, shared memory") and lines[3].startswith("gloo: ")
    assert lines[4].startswith("floor: bare futex wake on one shared word")
    assert lines[5] == "shm wake / bare futex wake: 2.00x at p50"
    assert lines[6] == "a waiting shm reader sleeps in: futex (SYS_futex 202 on x86_64)"


# --- latency report ----------------------------------------------------------------------------------------


def _latency(**per_path: tuple[list[int], list[int]]) -> list[dict]:
    return [{"rank": rank, "samples_ns": {name: values[rank] for name, values in per_path.items()}} for rank in (0, 1)]


def _results() -> list[dict]:
    return _latency(
        legacy=([8000, 8000], [16000, 16000]),
        gloo=([2000, 2000], [4000, 4000]),
        gloo_direct=([1500, 1500], [3500, 3500]),
        gloo_deadline=([3000, 3000], [3000, 3000]),
        shm=([100, 100], [300, 300]),
    )


def test_pooled_joins_every_ranks_samples_in_report_order() -> None:
    results = [{"rank": 0, "samples_ns": {"shm": [1], "legacy": [2], "legacy_gpu": [5]}}]
    results.append({"rank": 1, "samples_ns": {"shm": [3], "legacy": [4], "legacy_gpu": [6]}})
    assert list(pooled(results).items()) == [("legacy", [2, 4]), ("legacy_gpu", [5, 6]), ("shm", [1, 3])]
    assert list(pooled(results, ["shm", "nothing"]).items()) == [("shm", [1, 3])]


def test_build_report_pools_ranks_and_gives_the_three_ratios_and_both_costs() -> None:
    report = build_report(_results(), nranks=2, iters=2, warmup=9, backend="gloo", paddle_version="3.3.1")
    assert {k: report[k] for k in ("mode", "nranks", "iters", "warmup", "backend", "paddle_version")} == {
        "mode": "latency",
        "nranks": 2,
        "iters": 2,
        "warmup": 9,
        "backend": "gloo",
        "paddle_version": "3.3.1",
    }
    assert list(report["paths"]) == ["legacy", "gloo", "gloo_direct", "gloo_deadline", "shm"]
    legacy, shm = report["paths"]["legacy"], report["paths"]["shm"]
    assert legacy["label"] == PATH_LABELS["legacy"]
    assert (legacy["p50_us"], legacy["mean_us"], legacy["samples"]) == (12.0, 12.0, 4)
    assert shm["per_rank"] == {"0": summarize([100, 100]), "1": summarize([300, 300])}
    assert report["ratios"] == {
        "legacy_over_gloo": {"p50": 4.0, "mean": 4.0},
        "gloo_over_shm": {"p50": pytest.approx(15.0), "mean": pytest.approx(15.0)},
        "legacy_over_shm": {"p50": pytest.approx(60.0), "mean": pytest.approx(60.0)},
    }
    assert report["public_broadcast_cost_us"] == {"p50": pytest.approx(0.5), "mean": pytest.approx(0.5)}
    assert report["deadline_thread_cost_us"] == {"p50": pytest.approx(0.0), "mean": pytest.approx(0.0)}


def test_a_zero_time_gives_no_ratio_instead_of_dividing_by_zero() -> None:
    results = _latency(legacy=([10], [10]), gloo=([], []), gloo_direct=([], []), gloo_deadline=([], []), shm=([], []))
    report = build_report(results, nranks=2, iters=1, warmup=0, backend="gloo", paddle_version="x")
    assert report["ratios"]["legacy_over_gloo"] == {"p50": None, "mean": None}
    assert report["ratios"]["legacy_over_shm"] == {"p50": None, "mean": None}
    assert "legacy / gloo: n/a at p50, n/a at the mean" in format_report(report)


def test_format_report_shows_each_path_the_ratios_and_the_costs() -> None:
    report = build_report(_results(), nranks=2, iters=2, warmup=9, backend="gloo", paddle_version="3.3.1")
    lines = format_report(report).splitlines()
    assert lines[0] == (
        "signal sync per step, 2 ranks (gloo), 2 steps after 9 warm-up, Paddle 3.3.1; all ranks' samples pooled"
    )
    assert lines[1].split() == ["path", "p50", "us", "p99", "us", "mean", "us"]
    expected = {
        "legacy": ["12.0", "16.0", "12.0"],
        "gloo": ["3.0", "4.0", "3.0"],
        "gloo_direct": ["2.5", "3.5", "2.5"],
        "gloo_deadline": ["3.0", "3.0", "3.0"],
        "shm": ["0.2", "0.3", "0.2"],
    }
    for line, (name, cells) in zip(lines[2:7], expected.items(), strict=True):
        assert line.startswith(PATH_LABELS[name]) and line.split()[-3:] == cells
    assert lines[7:] == [
        "legacy / gloo: 4.00x at p50, 4.00x at the mean",
        "gloo / shm: 15.00x at p50, 15.00x at the mean",
        "legacy / shm: 60.00x at p50, 60.00x at the mean",
        "paddle.distributed.broadcast over the direct process-group call: +0.5 us per step at p50, "
        "+0.5 us at the mean",
        "deadline thread cost: +0.0 us per step at p50, +0.0 us at the mean",
    ]
    # The columns line up under their titles.
    assert len({len(line) for line in lines[1:7]}) == 1


# --- jitter report -----------------------------------------------------------------------------------------


def _jitter(nosync: int, gloo: int, shm: int, pipelined: int) -> list[dict]:
    paths = {"nosync": nosync, "gloo": gloo, "shm": shm, "shm_lookahead": pipelined}
    return [
        {"rank": rank, "samples_ns": {name: [ns, ns] for name, ns in paths.items()}, "work_us_mean": 299.0 + rank}
        for rank in (0, 1)
    ]


def test_build_jitter_report_gives_loop_time_per_step_and_overhead_over_no_sync() -> None:
    report = build_jitter_report(
        _jitter(300_000, 390_000, 330_000, 303_000), nranks=2, iters=2, warmup=1, paddle_version="3.3.1"
    )
    assert {k: v for k, v in report.items() if k != "paths"} == {
        "mode": "jitter",
        "nranks": 2,
        "iters": 2,
        "warmup": 1,
        "paddle_version": "3.3.1",
        "work_us": [200, 400],
        "work_us_mean": 299.5,
        "seed": 0,
        "lookahead": 4,
        "lookahead_over_lockstep_shm": pytest.approx(0.1),
    }
    paths = report["paths"]
    assert list(paths) == ["nosync", "gloo", "shm", "shm_lookahead"]
    assert [paths[name]["label"] for name in paths] == list(JITTER_LABELS.values())
    assert [paths[name]["mean_us"] for name in paths] == [300.0, 390.0, 330.0, 303.0]
    assert [paths[name]["overhead_pct"] for name in paths] == [
        pytest.approx(0.0),
        pytest.approx(30.0),
        pytest.approx(10.0),
        pytest.approx(1.0),
    ]


@pytest.mark.parametrize("shm", [300_000, 290_000])
def test_no_lookahead_share_when_lockstep_shm_costs_nothing(shm: int) -> None:
    report = build_jitter_report(
        _jitter(300_000, 390_000, shm, 303_000), nranks=2, iters=2, warmup=1, paddle_version="x"
    )
    assert report["lookahead_over_lockstep_shm"] is None
    assert format_jitter_report(report).endswith(
        "lookahead 4 overhead / lockstep shm overhead: n/a (lockstep shm cost nothing)"
    )


def test_no_overhead_without_a_no_sync_time() -> None:
    report = build_jitter_report(_jitter(0, 1, 1, 1), nranks=2, iters=2, warmup=1, paddle_version="x")
    assert all(path["overhead_pct"] is None for path in report["paths"].values())
    assert report["lookahead_over_lockstep_shm"] is None
    assert format_jitter_report(report).splitlines()[2].split()[-1] == "n/a"


def test_format_jitter_report_shows_loop_time_and_overhead_per_path() -> None:
    report = build_jitter_report(
        _jitter(300_000, 390_000, 330_000, 303_000), nranks=2, iters=2, warmup=1, paddle_version="3.3.1"
    )
    lines = format_jitter_report(report).splitlines()
    assert lines[0] == (
        "loop time per step with 200-400 us of CPU work per rank and step (mean 299.5 us), 2 ranks, 2 steps after "
        "1 warm-up, Paddle 3.3.1; all ranks' steps pooled"
    )
    assert lines[1].split() == ["path", "step", "us", "p50", "us", "p99", "us", "overhead"]
    assert lines[2].split() == ["no", "sync", "300.0", "300.0", "300.0", "+0.0%"]
    assert lines[3].split() == ["gloo,", "lockstep", "390.0", "390.0", "390.0", "+30.0%"]
    assert lines[4].split() == ["shm,", "lockstep", "330.0", "330.0", "330.0", "+10.0%"]
    assert lines[5].split() == ["shm,", "lookahead", "4", "303.0", "303.0", "303.0", "+1.0%"]
    assert lines[6] == "lookahead 4 overhead / lockstep shm overhead: 0.10"
    assert len(lines) == 7


def test_the_module_docstring_describes_the_schedule_the_ranks_run(fakes: FakeCollectives) -> None:
    # Latency and jitter: back to back per path, in rounds. Late src: the paths take turns step by step (pinned by
    # the late-rank test's order of signals).
    doc = " ".join(bench.__doc__.split())
    assert "In latency and jitter, each path runs its steps back to back" in doc
    assert "in ``ROUNDS`` rounds that rotate through the paths" in doc
    assert "In late src, where each step already sleeps, the paths take turns step by step" in doc
    with (
        mock.patch.object(bench, "measure", return_value={}) as timed,
        mock.patch.object(bench, "gpu_available", return_value=False),
    ):
        bench.bench_rank(iters=7, warmup=1)
        bench.jitter_rank(iters=7, warmup=1)
    assert bench.ROUNDS == 5
    for call in timed.call_args_list:
        assert call.args[1:] == (7, 1) and call.kwargs == {"rounds": 5, "barrier": fakes.barrier}


# --- plot ----------------------------------------------------------------------------------------------------


def test_load_pyplot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r"--plot needs matplotlib.*pip install 'fastdeploy-patch\[plot\]'"):
        load_pyplot()


def test_load_pyplot_selects_a_file_only_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpl = types.ModuleType("matplotlib")
    fake_mpl.use = mock.Mock()
    fake_plt = types.ModuleType("matplotlib.pyplot")
    fake_mpl.pyplot = fake_plt
    monkeypatch.setitem(sys.modules, "matplotlib", fake_mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", fake_plt)
    assert load_pyplot() is fake_plt
    fake_mpl.use.assert_called_once_with("Agg")


@pytest.mark.parametrize(
    ("mode", "results", "build", "xlabel"),
    [
        (
            "latency",
            _results(),
            lambda r: build_report(r, nranks=2, iters=2, warmup=0, backend="gloo", paddle_version="3.3.1"),
            "signal sync per step (us, log scale)",
        ),
        (
            "jitter",
            _jitter(4000, 5000, 6000, 7000),
            lambda r: build_jitter_report(r, nranks=2, iters=2, warmup=0, paddle_version="3.3.1"),
            "loop step (us, log scale)",
        ),
    ],
)
def test_plot_report_draws_one_cdf_per_path_and_saves_the_file(mode, results, build, xlabel) -> None:
    plt = mock.MagicMock()
    fig, ax = mock.Mock(), mock.Mock()
    plt.subplots.return_value = (fig, ax)
    report = build(results)
    assert report["mode"] == mode
    plot_report(results, report, "out.png", plt)
    labels = [call.kwargs["label"] for call in ax.step.call_args_list]
    assert labels == [f"{p['label']} (p50 {p['p50_us']:.0f} us)" for p in report["paths"].values()]
    xs, ys = ax.step.call_args_list[0].args
    first = [ns / 1000 for r in results for ns in next(iter(r["samples_ns"].values()))]
    assert list(xs) == sorted(first) and list(ys) == [0.25, 0.5, 0.75, 1.0]
    ax.set_xscale.assert_called_once_with("log")
    ax.set_xlabel.assert_called_once_with(xlabel)
    ax.set_title.assert_called_once_with("2 ranks, 2 steps, Paddle 3.3.1")
    fig.savefig.assert_called_once_with("out.png", dpi=120)
    plt.close.assert_called_once_with(fig)
