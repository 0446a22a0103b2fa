"""The benchmarks' reports: statistics, the JSON-ready dicts, the tables and the plot, from made-up rank results
(matplotlib faked)."""

from __future__ import annotations

import sys
import types
from unittest import mock

import pytest

from fastdeploy_patch.cli.bench.reports import (
    build_jitter_report,
    build_late_report,
    build_latency_report,
    format_jitter_report,
    format_late_report,
    format_latency_report,
    load_pyplot,
    mean_us,
    percentile_us,
    plot_report,
    pooled,
    summarize,
)

# --- statistics -------------------------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_and_converts_ns_to_us() -> None:
    samples = [4000, 1000, 3000, 2000]
    assert percentile_us(samples, 50) == pytest.approx(2.5)
    assert percentile_us(samples, 99) == pytest.approx(3.97)
    assert percentile_us(samples, 0) == pytest.approx(1.0)


def test_statistics_of_no_samples_are_zero() -> None:
    assert percentile_us([], 50) == 0.0
    assert mean_us([]) == 0.0
    assert summarize([]) == {"p50_us": 0.0, "p99_us": 0.0, "mean_us": 0.0, "samples": 0}


def test_summarize_gives_p50_p99_mean_in_us_and_the_count() -> None:
    assert summarize([1000, 2000, 6000]) == {
        "p50_us": pytest.approx(2.0),
        "p99_us": pytest.approx(5.92),
        "mean_us": pytest.approx(3.0),
        "samples": 3,
    }


def test_pooled_joins_every_ranks_samples_in_the_order_given() -> None:
    results = [{"rank": 0, "samples_ns": {"shm": [1], "legacy": [2], "legacy_gpu": [5]}}]
    results.append({"rank": 1, "samples_ns": {"shm": [3], "legacy": [4], "legacy_gpu": [6]}})
    order = ["legacy", "legacy_gpu", "shm"]
    assert list(pooled(results, order).items()) == [("legacy", [2, 4]), ("legacy_gpu", [5, 6]), ("shm", [1, 3])]
    assert list(pooled(results, ["shm", "nothing"]).items()) == [("shm", [1, 3])]


# --- latency ----------------------------------------------------------------------------------------------------


def _latency(**per_path: tuple[list[int], list[int]]) -> list[dict]:
    return [{"rank": rank, "samples_ns": {name: values[rank] for name, values in per_path.items()}} for rank in (0, 1)]


def _results() -> list[dict]:
    return _latency(
        legacy=([8000, 8000], [16000, 16000]),
        gloo=([2000, 2000], [4000, 4000]),
        gloo_deadline=([3000, 3000], [3000, 5000]),
        shm=([100, 100], [300, 300]),
    )


def test_build_latency_report_pools_ranks_and_gives_the_three_ratios_and_the_deadline_cost() -> None:
    report = build_latency_report(_results(), nranks=2, iters=2, warmup=9, backend="gloo", paddle_version="3.3.1")
    assert {k: report[k] for k in ("mode", "nranks", "iters", "warmup", "backend", "paddle_version")} == {
        "mode": "latency",
        "nranks": 2,
        "iters": 2,
        "warmup": 9,
        "backend": "gloo",
        "paddle_version": "3.3.1",
    }
    assert list(report) == [
        *("mode", "nranks", "iters", "warmup", "backend", "paddle_version"),
        *("paths", "ratios", "deadline_thread_cost_us"),
    ]
    assert list(report["paths"]) == ["legacy", "gloo", "gloo_deadline", "shm"]
    legacy, shm = report["paths"]["legacy"], report["paths"]["shm"]
    assert legacy["label"] == "legacy: broadcast_object_list, default group"
    assert (legacy["p50_us"], legacy["mean_us"], legacy["samples"]) == (12.0, 12.0, 4)
    assert shm["per_rank"] == {"0": summarize([100, 100]), "1": summarize([300, 300])}
    assert report["ratios"] == {
        "legacy_over_gloo": {"p50": 4.0, "mean": 4.0},
        "gloo_over_shm": {"p50": pytest.approx(15.0), "mean": pytest.approx(15.0)},
        "legacy_over_shm": {"p50": pytest.approx(60.0), "mean": pytest.approx(60.0)},
    }
    # The deadline row over plain gloo: p50 3.0 - 3.0 us, mean 3.5 - 3.0 us.
    assert report["deadline_thread_cost_us"] == {"p50": pytest.approx(0.0), "mean": pytest.approx(0.5)}


def test_the_gpu_row_comes_right_after_the_legacy_row_when_the_ranks_timed_it() -> None:
    results = _latency(
        shm=([1], [1]), legacy_gpu=([2], [2]), gloo=([3], [3]), legacy=([4], [4]), gloo_deadline=([5], [5])
    )
    report = build_latency_report(results, nranks=2, iters=1, warmup=0, backend="nccl", paddle_version="x")
    assert list(report["paths"]) == ["legacy", "legacy_gpu", "gloo", "gloo_deadline", "shm"]
    assert report["paths"]["legacy_gpu"]["label"] == "legacy: GPU tensor broadcast + .numpy()"


def test_a_zero_time_gives_no_ratio_instead_of_dividing_by_zero() -> None:
    results = _latency(legacy=([10], [10]), gloo=([], []), gloo_deadline=([], []), shm=([], []))
    report = build_latency_report(results, nranks=2, iters=1, warmup=0, backend="gloo", paddle_version="x")
    assert report["ratios"]["legacy_over_gloo"] == {"p50": None, "mean": None}
    assert report["ratios"]["legacy_over_shm"] == {"p50": None, "mean": None}
    assert "legacy / gloo: n/a at p50, n/a at the mean" in format_latency_report(report)


def test_format_latency_report_shows_each_path_the_ratios_and_the_deadline_cost() -> None:
    report = build_latency_report(_results(), nranks=2, iters=2, warmup=9, backend="gloo", paddle_version="3.3.1")
    lines = format_latency_report(report).splitlines()
    assert lines[0] == (
        "signal sync per step, 2 ranks (gloo), 2 steps after 9 warm-up, Paddle 3.3.1; all ranks' samples pooled"
    )
    assert lines[1].split() == ["path", "p50", "us", "p99", "us", "mean", "us"]
    expected = {
        "legacy: broadcast_object_list, default group": ["12.0", "16.0", "12.0"],
        "gloo: broadcast_signal (paddle.distributed.broadcast)": ["3.0", "4.0", "3.0"],
        "gloo, 5 s timeout (deadline thread)": ["3.0", "4.9", "3.5"],
        "shm: broadcast_signal, shared memory": ["0.2", "0.3", "0.2"],
    }
    for line, (label, cells) in zip(lines[2:6], expected.items(), strict=True):
        assert line.startswith(label) and line.split()[-3:] == cells
    assert lines[6:] == [
        "legacy / gloo: 4.00x at p50, 4.00x at the mean",
        "gloo / shm: 15.00x at p50, 15.00x at the mean",
        "legacy / shm: 60.00x at p50, 60.00x at the mean",
        "deadline thread cost: +0.0 us per step at p50, +0.5 us at the mean",
    ]
    # The columns line up under their titles, two spaces apart, each 9 wide, after the labels, left-aligned.
    assert len({len(line) for line in lines[1:6]}) == 1
    assert lines[1].startswith("path ")
    assert lines[1].endswith("     p50 us     p99 us    mean us")


# --- jitter -----------------------------------------------------------------------------------------------------


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
    # The work and its seed, as documented, so that runs can be compared.
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
    assert [paths[name]["label"] for name in paths] == [
        "no sync",
        "gloo, lockstep",
        "shm, lockstep",
        "shm, lookahead 4",
    ]
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


def test_a_small_lockstep_overhead_still_gives_the_lookaheads_share() -> None:
    report = build_jitter_report(
        _jitter(300_000, 390_000, 301_500, 300_750), nranks=2, iters=2, warmup=1, paddle_version="x"
    )
    # Lockstep shm +0.5%, the lookahead +0.25%.
    assert report["lookahead_over_lockstep_shm"] == pytest.approx(0.5)


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


# --- late src ---------------------------------------------------------------------------------------------------


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
    report = build_late_report(_late_results(), nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3")
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
    assert gloo["label"] == "gloo: broadcast_signal (paddle.distributed.broadcast)"
    assert (gloo["wake_p50_us"], gloo["reader_cpu_pct"], gloo["src_publish_p50_us"]) == pytest.approx(
        (250.0, 10.0, 100.0)
    )
    assert floor["label"] == "floor: bare futex wake on one shared word"
    assert (floor["wake_p50_us"], floor["reader_cpu_pct"], floor["src_publish_p99_us"]) == pytest.approx(
        (12.5, 1.0, 0.5)
    )
    assert report["shm_wake_over_floor_p50"] == pytest.approx(2.0) and report["no_floor_because"] is None


def test_every_reader_counts_in_the_wakes_and_the_cpu_share() -> None:
    reader, src = _late_results(floor=False)
    # A second reader that wakes 50 us after each call, at 30% of a core.
    other = {
        **reader,
        "rank": 2,
        "stamps_ns": {name: [called + 50_000 for called in src["stamps_ns"][name]] for name in ("shm", "gloo")},
        "cpu_s": {"shm": 0.022, "gloo": 0.022},
    }
    report = build_late_report([src, reader, other], nranks=3, iters=4, warmup=0, late_ms=1.0, paddle_version="3")
    shm = report["paths"]["shm"]
    assert shm["samples"] == 8
    assert shm["wake_mean_us"] == pytest.approx((10 + 20 + 30 + 40 + 4 * 50) / 8)
    assert shm["reader_cpu_pct"] == pytest.approx((0.002 + 0.022) / 0.08 * 100)


def test_a_late_report_without_a_floor_says_why_and_gives_no_ratio() -> None:
    report = build_late_report(
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
    report = build_late_report(empty, nranks=2, iters=0, warmup=0, late_ms=1.0, paddle_version="3")
    assert report["paths"]["shm"]["wake_mean_us"] == 0.0 and report["paths"]["shm"]["reader_cpu_pct"] == 0.0
    assert report["shm_wake_over_floor_p50"] is None
    assert format_late_report(report).splitlines()[-2] == "shm wake / bare futex wake: n/a at p50"


def test_a_src_that_timed_fewer_steps_than_a_reader_is_an_error() -> None:
    results = _late_results()
    results[1]["stamps_ns"]["shm"].pop()
    with pytest.raises(ValueError, match="zip"):
        build_late_report(results, nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3")


def test_format_late_report_shows_wake_percentiles_cpu_and_publish_per_path_and_the_ratio_to_the_floor() -> None:
    report = build_late_report(_late_results(), nranks=2, iters=4, warmup=1, late_ms=10.0, paddle_version="3")
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


# --- plot -------------------------------------------------------------------------------------------------------


def test_load_pyplot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        RuntimeError, match=r"^--plot needs matplotlib, an optional extra: pip install 'fastdeploy-patch\[plot\]'$"
    ):
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
            lambda r: build_latency_report(r, nranks=2, iters=2, warmup=0, backend="gloo", paddle_version="3.3.1"),
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
    assert all(call.kwargs["where"] == "post" for call in ax.step.call_args_list)
    xs, ys = ax.step.call_args_list[0].args
    first = [ns / 1000 for r in results for ns in next(iter(r["samples_ns"].values()))]
    assert list(xs) == sorted(first) and list(ys) == [0.25, 0.5, 0.75, 1.0]
    ax.set_xscale.assert_called_once_with("log")
    ax.set_xlabel.assert_called_once_with(xlabel)
    ax.set_ylabel.assert_called_once_with("fraction of steps")
    ax.set_title.assert_called_once_with("2 ranks, 2 steps, Paddle 3.3.1")
    # The figure: 8 x 4.5 in at 120 dpi, log time axis with its minor grid, the legend clear of the rising curves.
    plt.subplots.assert_called_once_with(figsize=(8, 4.5))
    ax.grid.assert_called_once_with(True, which="both", alpha=0.3)
    ax.legend.assert_called_once_with(loc="lower right", fontsize="small")
    fig.tight_layout.assert_called_once_with()
    fig.savefig.assert_called_once_with("out.png", dpi=120)
    plt.close.assert_called_once_with(fig)
