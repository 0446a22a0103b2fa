"""The benchmarks' ranks and their timing, with collectives, clocks and futex calls faked (reports:
test_bench_reports.py; the command: test_cli.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import paddle
import pytest

from fastdeploy_patch import procfs, signal_group
from fastdeploy_patch.cli import bench
from fastdeploy_patch.cli.bench import jitter, late_src, latency, reports, timing
from fastdeploy_patch.signal_group import GLOO_OP_TIMEOUT_S, futex

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


def _no_barrier() -> None:
    pass


def test_measure_warms_up_untimed_then_times_each_path_back_to_back() -> None:
    rec = Recorder()
    paths = {"a": rec.path("a", 100), "b": rec.path("b", 7)}
    samples = timing.measure(paths, iters=3, warmup=2, rounds=1, barrier=_no_barrier, clock=rec.clock)
    assert rec.calls == ["a", "a", "b", "b", "a", "a", "a", "b", "b", "b"]
    # Each duration is the path's cost plus the one clock tick of the second reading.
    assert samples == {"a": [101, 101, 101], "b": [8, 8, 8]}


def test_measure_spreads_the_iterations_over_rounds_that_rotate_through_the_paths() -> None:
    rec = Recorder()
    paths = {"a": rec.path("a", 5), "b": rec.path("b", 5)}
    samples = timing.measure(paths, iters=5, warmup=0, rounds=2, barrier=_no_barrier, clock=rec.clock)
    # 5 iterations in 2 rounds: 3, then 2.
    assert rec.calls == ["a", "a", "a", "b", "b", "b", "a", "a", "b", "b"]
    assert [len(samples["a"]), len(samples["b"])] == [5, 5]


def test_measure_meets_the_barrier_before_each_warm_up_and_each_turn_untimed() -> None:
    rec = Recorder()
    paths = {"a": rec.path("a", 5), "b": rec.path("b", 5)}
    samples = timing.measure(
        paths, iters=3, warmup=1, rounds=2, clock=rec.clock, barrier=lambda: rec.calls.append("|")
    )
    assert "".join(rec.calls) == "|a|b" + "|aa|bb" + "|a|b"
    assert samples == {"a": [6, 6, 6], "b": [6, 6, 6]}


def test_measure_reads_the_monotonic_nanosecond_clock_by_default() -> None:
    ticks = iter([10, 35, 40, 90])
    with mock.patch.object(timing.time, "perf_counter_ns", side_effect=lambda: next(ticks)):
        samples = timing.measure({"a": lambda: None}, iters=2, warmup=0, rounds=1, barrier=_no_barrier)
    assert samples == {"a": [25, 50]}


# --- fakes of the collectives ---------------------------------------------------------------------------


@dataclass
class FakeSignalGroup:
    kwargs: dict
    number: int
    closed: bool = False

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
        mock.patch.object(jitter, "busy_wait_us", side_effect=lambda us: None),
    ):
        yield fake


# --- latency --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "devices", "min_devices", "expected"),
    [(False, 8, 1, False), (True, 0, 1, False), (True, 1, 1, True), (True, 1, 2, False), (True, 2, 2, True)],
)
def test_gpu_available_needs_cuda_and_enough_devices(cuda: bool, devices: int, min_devices: int, expected: bool):
    with (
        mock.patch.object(paddle, "is_compiled_with_cuda", return_value=cuda),
        mock.patch.object(paddle.device.cuda, "device_count", return_value=devices),
    ):
        assert latency.gpu_available(min_devices) is expected


def test_gpu_available_asks_for_one_gpu_by_default() -> None:
    with (
        mock.patch.object(paddle, "is_compiled_with_cuda", return_value=True),
        mock.patch.object(paddle.device.cuda, "device_count", return_value=1),
    ):
        assert latency.gpu_available() is True


def test_latency_rank_times_every_path_on_the_right_groups(fakes: FakeCollectives) -> None:
    with mock.patch.object(latency, "gpu_available", return_value=False):
        result = latency.latency_rank(iters=3, warmup=2)
    assert result["rank"] == 0
    assert list(result["samples_ns"]) == ["legacy", "gloo", "gloo_deadline", "shm"]
    assert all(len(samples) == 3 for samples in result["samples_ns"].values())
    # Made once before timing: gloo, gloo with a timeout below its own limit (so its broadcasts take the deadline
    # thread), shared memory; closed after.
    assert [g.kwargs for g in fakes.groups] == [
        {"transport": "gloo"},
        {"transport": "gloo", "timeout": latency.DEADLINE_TIMEOUT_S},
        {"transport": "shm"},
    ]
    assert latency.DEADLINE_TIMEOUT_S < GLOO_OP_TIMEOUT_S
    assert all(g.closed for g in fakes.groups)
    # The legacy path sends the status object from rank 0 over the default group (no group argument).
    assert fakes.object_lists == [([0], 0)] * 5
    # Warm-up path by path, then the 3 timed steps spread over rounds: one step of each path per round.
    gloo, deadline, shm = (0, 0, 1), (0, 0, 2), (0, 0, 3)
    assert fakes.signals == [gloo] * 2 + [deadline] * 2 + [shm] * 2 + [gloo, deadline, shm] * 3
    assert fakes.tensors == []
    # One barrier before each path's warm-up and before each path's turn in each of the 5 rounds.
    assert fakes.barriers == 4 + 4 * 5


def test_latency_rank_receives_the_legacy_object_on_other_ranks(fakes: FakeCollectives) -> None:
    fakes.rank = 1
    with mock.patch.object(latency, "gpu_available", return_value=False):
        result = latency.latency_rank(iters=1, warmup=0)
    assert result["rank"] == 1
    assert fakes.object_lists == [([None], 0)]


def test_latency_rank_adds_the_gpu_tensor_path_when_a_gpu_is_visible(fakes: FakeCollectives) -> None:
    with mock.patch.object(latency, "gpu_available", return_value=True) as probe:
        result = latency.latency_rank(iters=2, warmup=1)
    probe.assert_called_once_with()
    assert list(result["samples_ns"]) == ["legacy", "legacy_gpu", "gloo", "gloo_deadline", "shm"]
    # A fresh int32 tensor broadcast from rank 0 over the default group, every step.
    assert fakes.tensors == [(0, 0, "paddle.int32")] * 3


def test_latency_rank_closes_its_groups_when_measuring_fails(fakes: FakeCollectives) -> None:
    with (
        mock.patch.object(latency, "gpu_available", return_value=False),
        mock.patch.object(latency, "measure", side_effect=TimeoutError("stuck")),
        pytest.raises(TimeoutError, match="stuck"),
    ):
        latency.latency_rank(iters=1, warmup=0)
    assert len(fakes.groups) == 3 and all(g.closed for g in fakes.groups)


def test_the_latency_paths_return_what_they_received(fakes: FakeCollectives) -> None:
    captured: dict = {}

    def keep_paths(paths, iters, warmup, rounds, barrier):
        captured.update(paths)
        return {}

    with (
        mock.patch.object(latency, "gpu_available", return_value=True),
        mock.patch.object(latency, "measure", keep_paths),
    ):
        latency.latency_rank(iters=1, warmup=0)
    value = captured["legacy_gpu"]()
    assert isinstance(value, np.integer) and value == 0
    assert [captured[name]() for name in ("legacy", "gloo", "gloo_deadline", "shm")] == [0] * 4


# --- jitter ---------------------------------------------------------------------------------------------


def test_busy_wait_spins_until_the_clock_passes_the_end() -> None:
    ticks = iter([1000, 1500, 2999, 3000, 9999])
    reads: list[int] = []

    def clock() -> int:
        reads.append(next(ticks))
        return reads[-1]

    jitter.busy_wait_us(2, clock=clock)
    assert reads == [1000, 1500, 2999, 3000]


def test_busy_wait_reads_the_monotonic_nanosecond_clock_by_default() -> None:
    ticks = iter([0, 100_000, 299_999, 300_000, 10**9])
    with mock.patch.object(jitter.time, "perf_counter_ns", side_effect=lambda: next(ticks)) as clock:
        jitter.busy_wait_us(300)
    assert clock.call_count == 4


def test_work_draws_cover_the_documented_range_and_repeat_per_rank_and_seed() -> None:
    draws = jitter.work_draws(0, 2000)
    assert len(draws) == 2000 and all(type(us) is int for us in draws)
    # 200-400 us, both ends included (docs/benchmarks.md).
    assert (min(draws), max(draws)) == (200, 400)
    assert draws == jitter.work_draws(0, 2000) == jitter.work_draws(0, 2000, seed=jitter.SEED)
    assert draws != jitter.work_draws(1, 2000)
    assert draws != jitter.work_draws(0, 2000, seed=1)


def test_a_jitter_step_works_through_the_draws_then_syncs_and_cycles() -> None:
    log: list[object] = []
    step = jitter.jitter_step([3, 1, 2], lambda: log.append("sync"), work=log.append)
    for _ in range(4):
        step()
    assert log == [3, "sync", 1, "sync", 2, "sync", 3, "sync"]


def test_jitter_rank_runs_the_same_work_with_each_sync_path(fakes: FakeCollectives) -> None:
    fakes.rank = 1
    worked: list[int] = []
    with mock.patch.object(jitter, "busy_wait_us", side_effect=worked.append):
        result = jitter.jitter_rank(iters=4, warmup=2)
    assert result["rank"] == 1
    assert list(result["samples_ns"]) == ["nosync", "gloo", "shm", "shm_lookahead"]
    assert all(len(samples) == 4 for samples in result["samples_ns"].values())
    assert [g.kwargs for g in fakes.groups] == [
        {"transport": "gloo"},
        {"transport": "shm"},
        {"transport": "shm", "lookahead": jitter.LOOKAHEAD},
    ]
    assert all(g.closed for g in fakes.groups)
    draws = jitter.work_draws(1, 6)
    assert result["work_us_mean"] == pytest.approx(sum(draws) / 6)
    # Every path goes through this rank's same draws: the warm-up's 2, then the timed 4.
    assert len(worked) == 4 * 6
    assert sorted(worked) == sorted(draws * 4)
    # nosync sends nothing; the others send rank 0's status on their own group, 6 times each.
    assert sorted(fakes.signals) == sorted([(0, 0, 1)] * 6 + [(0, 0, 2)] * 6 + [(0, 0, 3)] * 6)
    # One barrier before each path's warm-up and before each path's turn in each of the 5 rounds.
    assert fakes.barriers == 4 + 4 * 5


def test_jitter_rank_closes_its_groups_when_measuring_fails(fakes: FakeCollectives) -> None:
    with mock.patch.object(jitter, "measure", side_effect=RuntimeError("lost")), pytest.raises(RuntimeError):
        jitter.jitter_rank(iters=1, warmup=0)
    assert len(fakes.groups) == 3 and all(g.closed for g in fakes.groups)


# --- late src -------------------------------------------------------------------------------------------


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
    page_ranks: list[int] = field(default_factory=list)

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
        mock.patch.object(late_src.time, "sleep", clock.sleep),
        mock.patch.object(late_src.time, "perf_counter_ns", clock.perf_counter_ns),
        mock.patch.object(late_src.time, "perf_counter", clock.perf_counter),
        mock.patch.object(late_src.time, "process_time", clock.process_time),
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
        fake.page_ranks.append(rank)
        pages.append(mmap.mmap(-1, mmap.PAGESIZE))
        return pages[-1]

    with (
        mock.patch.object(signal_group, "futex_support", return_value=futex.Support(fake, "fake")),
        mock.patch.object(late_src, "shared_page", side_effect=page),
    ):
        yield fake
    assert all(p.closed for p in pages)


@pytest.mark.parametrize("rank", [0, 1])
def test_late_rank_times_each_transport_and_the_floor_with_the_src_sleeping_before_each_timed_publish(
    fakes: FakeCollectives, late_clock: LateClock, floor_futex: FakeFutex, rank: int
) -> None:
    fakes.rank = rank
    result = late_src.late_rank(iters=6, warmup=2, late_ms=2.0)
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
    # The floor's page: made by rank 0, mapped by the others, each asking as the rank it is.
    assert floor_futex.page_ranks == [rank]
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
    assert result["cpu_s"] == pytest.approx({name: seconds / 10 for name, seconds in result["wall_s"].items()})


def test_late_rank_without_futex_runs_no_floor_and_says_why(fakes: FakeCollectives, late_clock: LateClock) -> None:
    result = late_src.late_rank(iters=5, warmup=0, late_ms=1.0)
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
        late_src.late_rank(iters=1, warmup=0, late_ms=1.0)
    assert len(fakes.groups) == 2 and all(g.closed for g in fakes.groups)


def test_the_floors_src_stores_the_step_and_wakes_the_word() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    fake = FakeFutex()
    floor = late_src.FutexFloor(fake, page, src=True)
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
    floor = late_src.FutexFloor(fake, page, src=False)
    # One sleep for all that is left of the step's timeout: no timeout of its own ends near the publish.
    with mock.patch.object(late_src.time, "monotonic", mock.Mock(side_effect=[100.0, 100.25])):
        floor.call()
    assert [(expected, seconds) for _, expected, seconds in fake.waits] == [(0, late_src.FLOOR_TIMEOUT_S - 0.25)]
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
    floor = late_src.FutexFloor(fake, page, src=False)
    # A wait that returned without the step (a signal, a spurious wake) sleeps again for what is left, down to the
    # last half second; at the deadline exactly, it gives up.
    clock = mock.Mock(side_effect=[0.0, 1.0, late_src.FLOOR_TIMEOUT_S - 0.5, late_src.FLOOR_TIMEOUT_S])
    with mock.patch.object(late_src.time, "monotonic", clock), pytest.raises(TimeoutError) as err:
        floor.call()
    assert str(err.value) == "the floor's src did not publish step 1 within 60 s"
    assert [seconds for _, _, seconds in fake.waits] == [late_src.FLOOR_TIMEOUT_S - 1.0, 0.5]
    floor.close()


def test_a_shared_page_is_one_memory_for_every_rank_and_leaves_no_descriptor() -> None:
    """Both ranks in this process: rank 0's barrier is where rank 1 maps the page, through rank 0's descriptor."""
    boxes: list[list] = []
    pages: dict[int, mmap.mmap] = {}

    def broadcast_object_list(box: list, src: int) -> None:
        assert src == 0
        if boxes:
            box[0] = boxes[0][0]
        boxes.append(box)

    names: list[str] = []

    def barrier() -> None:
        if 1 not in pages and len(boxes) == 1:
            # The memory has a name only where /proc shows descriptors (lsof, leak checks): what made it.
            names.append(os.readlink(boxes[0][0]))
            pages[1] = late_src.shared_page(1)

    fds_before = procfs.fds("self")
    with (
        mock.patch("paddle.distributed.broadcast_object_list", side_effect=broadcast_object_list),
        mock.patch("paddle.distributed.barrier", side_effect=barrier),
    ):
        pages[0] = late_src.shared_page(0)
    assert names == ["/memfd:fdp-bench-floor (deleted)"]
    assert len(pages[0]) == len(pages[1]) == mmap.PAGESIZE
    pages[0][:4] = b"ping"
    assert pages[1][:4] == b"ping"
    for page in pages.values():
        page.close()
    assert procfs.fds("self") == fds_before


# --- the table of modes ---------------------------------------------------------------------------------


def test_each_flag_picks_its_mode() -> None:
    assert bench.mode_for(False, None) is bench.MODES["latency"]
    assert bench.mode_for(True, None) is bench.MODES["jitter"]
    assert bench.mode_for(False, 2.0) is bench.MODES["src_late"]


@pytest.mark.parametrize(
    ("name", "module", "function"),
    [
        ("latency", latency, latency.latency_rank),
        ("jitter", jitter, jitter.jitter_rank),
        ("src_late", late_src, late_src.late_rank),
    ],
)
def test_each_mode_names_the_rank_function_of_its_module(name: str, module, function) -> None:
    path, attribute = bench.MODES[name].rank_function.split(":")
    assert (path, getattr(module, attribute)) == (module.__name__, function)


@pytest.mark.parametrize(
    ("late_ms", "kwargs"), [(None, {"iters": 50, "warmup": 3}), (0.3, {"iters": 50, "warmup": 3, "late_ms": 0.3})]
)
def test_the_ranks_get_the_late_gap_only_when_there_is_one(late_ms: float | None, kwargs: dict) -> None:
    assert bench.Run(2, 50, 3, "gloo", "3", late_ms).rank_kwargs() == kwargs


def test_the_default_timeout_allows_the_start_every_step_and_each_late_steps_sleep() -> None:
    assert bench.Run(2, 5000, 200, "gloo", "3").default_timeout() == pytest.approx(120.0 + 5200 * 0.02)
    # 3 late paths (shm, gloo, floor), each timed step sleeping 2 ms, with a quarter to spare.
    assert bench.Run(2, 5000, 200, "gloo", "3", 2.0).default_timeout() == pytest.approx(
        120.0 + 5200 * 0.02 + 5000 * 3 * 2.0e-3 * 1.25
    )


@pytest.mark.parametrize(
    ("name", "late_ms", "line"),
    [
        ("latency", None, "bench: 4 ranks (nccl), 9 warm-up + 70 timed steps per path..."),
        ("jitter", None, "bench: 4 ranks (nccl), 9 warm-up + 70 loop steps with per-rank CPU work per path..."),
        ("src_late", 0.25, "bench: 4 ranks (nccl), 9 warm-up + 70 steps with the src 0.25 ms late per path..."),
    ],
)
def test_each_modes_progress_line_says_what_runs(name: str, late_ms: float | None, line: str) -> None:
    assert bench.MODES[name].progress(bench.Run(4, 70, 9, "nccl", "3", late_ms)) == line


def test_each_mode_builds_its_own_report_from_the_run() -> None:
    latency_results = [{"rank": 0, "samples_ns": {name: [1000] for name in latency.LABELS}}]
    run = bench.Run(1, 1, 0, "nccl", "3.3")
    assert bench.MODES["latency"].report(latency_results, run) == reports.build_latency_report(
        latency_results, nranks=1, iters=1, warmup=0, backend="nccl", paddle_version="3.3"
    )
    jitter_results = [{"rank": 0, "samples_ns": {name: [1000] for name in jitter.LABELS}, "work_us_mean": 1.0}]
    assert bench.MODES["jitter"].report(jitter_results, run) == reports.build_jitter_report(
        jitter_results, nranks=1, iters=1, warmup=0, paddle_version="3.3"
    )
    late_results = [
        {
            "rank": 0,
            "stamps_ns": {"shm": [0], "gloo": [0]},
            "publish_ns": {"shm": [5], "gloo": [5]},
            "wait": ["futex", "x"],
            "floor": "none here",
        },
        {
            "rank": 1,
            "stamps_ns": {"shm": [9], "gloo": [9]},
            "cpu_s": {"shm": 1, "gloo": 1},
            "wall_s": {"shm": 2, "gloo": 2},
        },
    ]
    late_run = bench.Run(2, 1, 0, "gloo", "3.3", 0.5)
    assert bench.MODES["src_late"].report(late_results, late_run) == reports.build_late_report(
        late_results, nranks=2, iters=1, warmup=0, late_ms=0.5, paddle_version="3.3"
    )
    for name, table in [
        ("latency", reports.format_latency_report),
        ("jitter", reports.format_jitter_report),
        ("src_late", reports.format_late_report),
    ]:
        assert bench.MODES[name].table is table


@pytest.mark.parametrize(("available", "backend"), [(True, "nccl"), (False, "gloo")])
def test_pick_backend_is_nccl_only_with_a_gpu_per_rank(available: bool, backend: str) -> None:
    with mock.patch.object(latency, "gpu_available", return_value=available) as probe:
        assert bench.pick_backend(4) == backend
    probe.assert_called_once_with(4)
