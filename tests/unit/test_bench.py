"""The benchmark's measurement, statistics, report and plot, with collectives and matplotlib faked."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import paddle
import pytest

from fastdeploy_patch import bench, signal_group
from fastdeploy_patch.bench import (
    DEADLINE_TIMEOUT_S,
    PATH_LABELS,
    build_report,
    format_report,
    gpu_available,
    load_pyplot,
    measure,
    percentile_us,
    pick_backend,
    plot_report,
    pooled,
    summarize,
)

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


def test_measure_uses_the_monotonic_nanosecond_clock_by_default() -> None:
    samples = measure({"a": lambda: None}, iters=2, warmup=0)
    assert len(samples["a"]) == 2 and all(isinstance(ns, int) and ns >= 0 for ns in samples["a"])


def test_the_module_docstring_describes_the_schedule_bench_rank_runs() -> None:
    # Back to back per path, in rounds: not step by step across the paths.
    assert "back to back" in bench.__doc__ and "in ``ROUNDS`` rounds that rotate through the paths" in bench.__doc__
    assert "step by step" not in bench.__doc__
    with (
        mock.patch.object(bench, "measure", return_value={}) as timed,
        mock.patch.object(bench, "gpu_available", return_value=False),
        mock.patch.object(signal_group, "new_signal_group"),
        mock.patch("paddle.distributed.get_rank", return_value=0),
    ):
        bench.bench_rank(iters=7, warmup=1)
    assert timed.call_args.kwargs == {"rounds": bench.ROUNDS} and bench.ROUNDS == 5


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


# --- bench_rank ----------------------------------------------------------------------------------------


@dataclass
class FakeCollectives:
    """The distributed calls ``bench_rank`` makes, recorded with the group each one used."""

    rank: int = 0
    object_lists: list[tuple[list, int]] = field(default_factory=list)
    tensors: list[tuple[int, int, str]] = field(default_factory=list)
    signals: list[tuple[int, int, object]] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    def new_signal_group(self, **kwargs: object) -> object:
        self.groups.append(kwargs)
        return f"signal-group-{len(self.groups)}"

    def broadcast_object_list(self, box: list, src: int) -> None:
        self.object_lists.append((list(box), src))
        box[0] = 0

    def broadcast(self, tensor: paddle.Tensor, src: int) -> None:
        self.tensors.append((int(tensor.item()), src, str(tensor.dtype)))

    def broadcast_signal(self, value: int, src: int, group: object) -> int:
        self.signals.append((value, src, group))
        return value


@pytest.fixture
def fakes() -> Iterator[FakeCollectives]:
    fake = FakeCollectives()
    with (
        mock.patch("paddle.distributed.get_rank", side_effect=lambda: fake.rank),
        mock.patch("paddle.distributed.broadcast_object_list", side_effect=fake.broadcast_object_list),
        mock.patch("paddle.distributed.broadcast", side_effect=fake.broadcast),
        mock.patch.object(signal_group, "new_signal_group", side_effect=fake.new_signal_group),
        mock.patch.object(signal_group, "broadcast_signal", side_effect=fake.broadcast_signal),
    ):
        yield fake


def test_bench_rank_times_legacy_then_patch_paths_on_the_right_groups(fakes: FakeCollectives) -> None:
    with mock.patch.object(bench, "gpu_available", return_value=False):
        result = bench.bench_rank(iters=3, warmup=2)
    assert result["rank"] == 0
    assert list(result["samples_ns"]) == ["legacy", "patch", "patch_deadline"]
    assert all(len(samples) == 3 for samples in result["samples_ns"].values())
    # One plain signal group and one with a timeout below gloo's limit, made once before timing.
    assert fakes.groups == [{}, {"timeout": DEADLINE_TIMEOUT_S}]
    # The legacy path sends the status object from rank 0 over the default group (no group argument).
    assert fakes.object_lists == [([0], 0)] * 5
    # Warm-up path by path, then the 3 timed steps spread over rounds: one step of each path per round.
    plain, deadline = (0, 0, "signal-group-1"), (0, 0, "signal-group-2")
    assert fakes.signals == [plain, plain, deadline, deadline] + [plain, deadline] * 3
    assert fakes.tensors == []


def test_bench_rank_receives_the_legacy_object_on_other_ranks(fakes: FakeCollectives) -> None:
    fakes.rank = 1
    with mock.patch.object(bench, "gpu_available", return_value=False):
        result = bench.bench_rank(iters=1, warmup=0)
    assert result["rank"] == 1
    assert fakes.object_lists == [([None], 0)]


def test_bench_rank_adds_the_gpu_tensor_path_when_a_gpu_is_visible(fakes: FakeCollectives) -> None:
    with mock.patch.object(bench, "gpu_available", return_value=True):
        result = bench.bench_rank(iters=2, warmup=1)
    assert list(result["samples_ns"]) == ["legacy", "legacy_gpu", "patch", "patch_deadline"]
    # A fresh int32 tensor broadcast from rank 0 over the default group, every step.
    assert fakes.tensors == [(0, 0, "paddle.int32")] * 3


def test_the_legacy_gpu_path_reads_the_value_back_to_the_host(fakes: FakeCollectives) -> None:
    captured: dict = {}

    def keep_paths(paths, iters, warmup, rounds):
        captured.update(paths)
        return {}

    with mock.patch.object(bench, "gpu_available", return_value=True), mock.patch.object(bench, "measure", keep_paths):
        bench.bench_rank(iters=1, warmup=0)
    value = captured["legacy_gpu"]()
    assert isinstance(value, np.integer) and value == 0
    assert captured["legacy"]() == 0
    assert captured["patch_deadline"]() == 0


# --- report ------------------------------------------------------------------------------------------------


def _results() -> list[dict]:
    return [
        {"rank": 0, "samples_ns": {"legacy": [4000, 4000], "patch": [1000, 1000], "patch_deadline": [1500, 1500]}},
        {"rank": 1, "samples_ns": {"legacy": [8000, 8000], "patch": [2000, 2000], "patch_deadline": [2000, 2000]}},
    ]


def test_pooled_joins_every_ranks_samples_in_report_order() -> None:
    results = [{"rank": 0, "samples_ns": {"patch": [1], "legacy": [2], "legacy_gpu": [5]}}]
    results.append({"rank": 1, "samples_ns": {"patch": [3], "legacy": [4], "legacy_gpu": [6]}})
    assert list(pooled(results).items()) == [("legacy", [2, 4]), ("legacy_gpu", [5, 6]), ("patch", [1, 3])]


def test_build_report_pools_ranks_and_gives_ratios_and_the_deadline_cost() -> None:
    report = build_report(_results(), nranks=2, iters=2, warmup=9, backend="gloo", paddle_version="3.3.1")
    assert {k: report[k] for k in ("nranks", "iters", "warmup", "backend", "paddle_version")} == {
        "nranks": 2,
        "iters": 2,
        "warmup": 9,
        "backend": "gloo",
        "paddle_version": "3.3.1",
    }
    legacy, patch, deadline = (report["paths"][k] for k in ("legacy", "patch", "patch_deadline"))
    assert legacy["label"] == PATH_LABELS["legacy"]
    assert (legacy["p50_us"], legacy["mean_us"], legacy["samples"]) == (6.0, 6.0, 4)
    assert (patch["p50_us"], patch["mean_us"]) == (1.5, 1.5)
    assert deadline["per_rank"] == {"0": summarize([1500, 1500]), "1": summarize([2000, 2000])}
    assert report["ratio_legacy_over_patch"] == {"p50": 4.0, "mean": 4.0}
    assert report["deadline_thread_cost_us"] == {"p50": pytest.approx(0.25), "mean": pytest.approx(0.25)}


def test_a_zero_patch_time_gives_no_ratio_instead_of_dividing_by_zero() -> None:
    results = [{"rank": 0, "samples_ns": {"legacy": [10], "patch": [], "patch_deadline": []}}]
    report = build_report(results, nranks=1, iters=1, warmup=0, backend="gloo", paddle_version="x")
    assert report["ratio_legacy_over_patch"] == {"p50": None, "mean": None}
    assert "legacy / patch: n/a at p50, n/a at the mean" in format_report(report)


def test_format_report_shows_each_path_the_ratio_and_the_deadline_cost() -> None:
    report = build_report(_results(), nranks=2, iters=2, warmup=9, backend="gloo", paddle_version="3.3.1")
    lines = format_report(report).splitlines()
    assert lines[0] == (
        "signal sync per step, 2 ranks (gloo), 2 steps after 9 warm-up, Paddle 3.3.1; all ranks' samples pooled"
    )
    assert lines[1].split() == ["path", "p50", "us", "p99", "us", "mean", "us"]
    assert lines[2].startswith(PATH_LABELS["legacy"]) and lines[2].split()[-3:] == ["6.0", "8.0", "6.0"]
    assert lines[3].startswith(PATH_LABELS["patch"]) and lines[3].split()[-3:] == ["1.5", "2.0", "1.5"]
    assert lines[4].startswith(PATH_LABELS["patch_deadline"]) and lines[4].split()[-3:] == ["1.8", "2.0", "1.8"]
    assert lines[5] == "legacy / patch: 4.00x at p50, 4.00x at the mean"
    assert lines[6] == "deadline thread cost: +0.2 us per step at p50, +0.2 us at the mean"
    assert len(lines) == 7


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


def test_plot_report_draws_one_cdf_per_path_and_saves_the_file() -> None:
    plt = mock.MagicMock()
    fig, ax = mock.Mock(), mock.Mock()
    plt.subplots.return_value = (fig, ax)
    results = _results()
    report = build_report(results, nranks=2, iters=2, warmup=0, backend="gloo", paddle_version="3.3.1")
    plot_report(results, report, "out.png", plt)
    labels = [call.kwargs["label"] for call in ax.step.call_args_list]
    assert labels == [
        f"{PATH_LABELS['legacy']} (p50 6 us)",
        f"{PATH_LABELS['patch']} (p50 2 us)",
        f"{PATH_LABELS['patch_deadline']} (p50 2 us)",
    ]
    xs, ys = ax.step.call_args_list[0].args
    assert list(xs) == [4.0, 4.0, 8.0, 8.0] and list(ys) == [0.25, 0.5, 0.75, 1.0]
    ax.set_xscale.assert_called_once_with("log")
    ax.set_title.assert_called_once_with("2 ranks, 2 steps, Paddle 3.3.1")
    fig.savefig.assert_called_once_with("out.png", dpi=120)
    plt.close.assert_called_once_with(fig)
