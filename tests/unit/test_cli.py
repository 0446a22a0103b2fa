"""The `demo` and `bench` subcommands, with the ranks faked (argument errors: test_cli_arguments.py)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import ClassVar
from unittest import mock

import paddle
import pytest

from fastdeploy_patch import cli, ipc_signal
from fastdeploy_patch.cli import bench
from fastdeploy_patch.cli.bench import reports
from fastdeploy_patch.cli.bench.reports import build_latency_report, format_latency_report
from fastdeploy_patch.cli.demo import DEFAULT_STEP_INTERVAL_S, format_table
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.status import ModelWeightsStatus
from fastdeploy_patch.testing.launcher import RankFailed

# --- defaults ------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    demo = cli.build_parser().parse_args(["demo"])
    assert (demo.nranks, demo.steps, demo.timeout, demo.transport, demo.lookahead) == (2, 200, None, "auto", 0)
    b = cli.build_parser().parse_args(["bench"])
    assert (b.nranks, b.iters, b.warmup, b.json, b.plot, b.timeout, b.jitter) == (
        2,
        5000,
        200,
        False,
        None,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["demo", "--transport", "tcp"],
            "argument --transport: invalid choice: 'tcp' (choose from 'auto', 'shm', 'gloo')",
        ),
        (
            ["demo", "--transport", "gloo", "--lookahead", "4"],
            "argument --lookahead: lookahead 4 needs the shared-memory transport, not gloo: use --transport shm or "
            "auto, or --lookahead 0",
        ),
        (
            ["demo", "--lookahead", "4", "--steps", "39"],
            "argument --steps: expected at least 40 steps with --lookahead 4, room for a whole clear/update cycle, "
            "got '39'",
        ),
        (
            ["demo", "--lookahead", "32", "--steps", "179"],
            "argument --steps: expected at least 180 steps with --lookahead 32, room for a whole clear/update "
            "cycle, got '179'",
        ),
    ],
)
def test_demo_flags_that_disagree_exit_2_before_starting_anything(argv, error, capsys) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks") as run, pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    run.assert_not_called()
    err = capsys.readouterr().err
    assert err.startswith("usage: fastdeploy-patch demo ")
    assert err.rstrip("\n").splitlines()[-1] == f"fastdeploy-patch demo: error: {error}"


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--transport", "shm", "--lookahead", "4", "--steps", "40"],
        ["demo", "--lookahead", "32", "--steps", "180"],
        ["demo", "--transport", "gloo", "--lookahead", "0", "--steps", "20"],
    ],
)
def test_demo_flags_that_agree_are_accepted(argv) -> None:
    args = cli.build_parser().parse_args(argv)
    assert cli._demo_flags_agree(args) is None


# --- demo ------------------------------------------------------------------------------------------------------


def _rank_result(rank: int, **changes: object) -> dict:
    result = {
        "rank": rank,
        "transport": "shm",
        "lookahead": 0,
        "published": [[8, "CLEARING"], [9, "CLEARED"], [12, "UPDATING"], [13, "NORMAL"]] if rank == 0 else [],
        "steps": 30,
        "transitions": [[8, "CLEARING"], [9, "CLEARED"], [12, "UPDATING"], [13, "NORMAL"]],
        "parameters_released": 2,
        "parameters_restored": 2,
        "groups_shut_down": 0,
        "groups_restarted": 0,
        "forward_passes": 25,
        "sync_p50_us": 150.0,
        "sync_p99_us": 900.0,
    }
    return {**result, **changes}


class FakeDriver:
    """Records how the CLI sets the engine up; its run() waits until the CLI stops it."""

    instances: ClassVar[list[FakeDriver]] = []
    error: str | None = None

    def __init__(self, status: StatusSignal, progress: StatusSignal, steps: int, out) -> None:
        self.status_name, self.progress_name, self.steps, self.out = status.name, progress.name, steps, out
        self.initial_status = int(status.value[0])
        self.thread_name: str | None = None
        self.stopped = False
        FakeDriver.instances.append(self)

    def run(self, stop: threading.Event, timeout: float) -> None:
        self.thread_name = threading.current_thread().name
        self.timeout = timeout
        self.out("[engine] hello")
        self.stopped = stop.wait(10)


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch):
    FakeDriver.instances = []
    monkeypatch.setattr(FakeDriver, "error", None)
    with mock.patch("fastdeploy_patch.cli.demo.Driver", FakeDriver):
        yield FakeDriver


class FakeRanks:
    """run_ranks for the demo: checks the segments the ranks would attach to, then returns or raises."""

    def __init__(self, results=None, error: BaseException | None = None) -> None:
        self.results, self.error = results, error
        self.calls: list[tuple] = []
        self.segments_seen: list[str] = []

    def __call__(self, target, nranks, *, kwargs, timeout):
        self.calls.append((target, nranks, kwargs, timeout))
        # Attach as rank 0 does; the tracker is faked because creator and attacher share this process.
        with mock.patch.object(ipc_signal, "resource_tracker"):
            for name in (kwargs["status_name"], kwargs["progress_name"]):
                with StatusSignal(name):
                    self.segments_seen.append(name)
        if self.error is not None:
            raise self.error
        return self.results


def _gone(names: list[str]) -> bool:
    return not any((Path("/dev/shm") / name).exists() for name in names)


def test_demo_runs_the_ranks_with_the_engine_driving_and_prints_the_table(driver, capsys) -> None:
    results = [_rank_result(0), _rank_result(1)]
    ranks = FakeRanks(results)
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", ranks):
        assert cli.main(["demo", "--nranks", "2", "--steps", "30"]) == 0
    [(target, nranks, kwargs, timeout)] = ranks.calls
    assert (target, nranks) == ("fastdeploy_patch.cli.demo:demo_rank", 2)
    assert (kwargs["steps"], kwargs["step_interval"]) == (30, DEFAULT_STEP_INTERVAL_S)
    assert (kwargs["transport"], kwargs["lookahead"]) == ("auto", 0)
    prefix = f"fdp-demo-{os.getpid()}-"
    assert kwargs["status_name"].startswith(prefix) and kwargs["status_name"].endswith("-status")
    assert kwargs["progress_name"].startswith(prefix) and kwargs["progress_name"].endswith("-progress")
    assert timeout == pytest.approx(120.0 + 30 * (DEFAULT_STEP_INTERVAL_S + 0.05))
    [engine] = driver.instances
    assert (engine.status_name, engine.progress_name, engine.steps) == (
        kwargs["status_name"],
        kwargs["progress_name"],
        30,
    )
    assert engine.initial_status == ModelWeightsStatus.NORMAL
    assert engine.thread_name == "demo-engine" and engine.timeout == timeout and engine.stopped
    assert ranks.segments_seen == [kwargs["status_name"], kwargs["progress_name"]]
    assert _gone(ranks.segments_seen)
    out = capsys.readouterr().out
    assert out.startswith(
        "demo: starting 2 CPU rank(s) for 30 steps (signal transport auto, lookahead 0); the engine drives one "
        "clear/update cycle\n"
    )
    assert "[engine] hello\n" in out
    assert format_table(results) in out
    assert out.endswith("demo: OK (2 ranks saw the whole clear/update cycle at the same steps)\n")


def test_demo_passes_the_transport_and_lookahead_to_every_rank(driver) -> None:
    shifted = [[12, "CLEARING"], [13, "CLEARED"], [16, "UPDATING"], [17, "NORMAL"]]
    results = [_rank_result(r, lookahead=4, transitions=shifted, steps=40) for r in (0, 1)]
    ranks = FakeRanks(results)
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", ranks):
        assert cli.main(["demo", "--transport", "shm", "--lookahead", "4", "--steps", "40"]) == 0
    kwargs = ranks.calls[0][2]
    assert (kwargs["transport"], kwargs["lookahead"], kwargs["steps"]) == ("shm", 4, 40)


def test_demo_takes_the_timeout_given(driver) -> None:
    ranks = FakeRanks([_rank_result(0, steps=20)])
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", ranks):
        assert cli.main(["demo", "--nranks", "1", "--steps", "20", "--timeout", "7"]) == 0
    assert ranks.calls[0][1] == 1 and ranks.calls[0][3] == 7.0 and driver.instances[0].timeout == 7.0


def test_demo_fails_when_the_engine_missed_a_phase(driver, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeDriver, "error", "the ranks stopped at step 30 before rank 0 reporting NORMAL")
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", FakeRanks([_rank_result(0), _rank_result(1)])):
        assert cli.main(["demo", "--steps", "30"]) == 1
    captured = capsys.readouterr()
    assert "ranks agree: yes" in captured.out and "demo: OK" not in captured.out
    assert captured.err == "demo: FAILED: engine: the ranks stopped at step 30 before rank 0 reporting NORMAL\n"


def test_demo_fails_when_the_ranks_disagree(driver, capsys) -> None:
    late = [[8, "CLEARING"], [10, "CLEARED"], [12, "UPDATING"], [13, "NORMAL"]]
    with mock.patch(
        "fastdeploy_patch.testing.launcher.run_ranks", FakeRanks([_rank_result(0), _rank_result(1, transitions=late)])
    ):
        assert cli.main(["demo", "--steps", "30"]) == 1
    captured = capsys.readouterr()
    assert "ranks agree: NO" in captured.out and "demo: OK" not in captured.out
    assert "demo: FAILED: rank 1 saw CLEARING@8 CLEARED@10" in captured.err


def test_demo_fails_when_a_rank_fails_and_still_removes_the_segments(driver, capsys) -> None:
    ranks = FakeRanks(
        error=RankFailed(rank=1, nranks=2, target="m:f", returncode=1, reports={0: "fine", 1: "Traceback: boom"})
    )
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", ranks):
        assert cli.main(["demo"]) == 1
    assert (
        "demo: FAILED: rank 1 of 2 failed in m:f: it exited before replying, exit code 1\n"
        "----- rank 1 -----\nTraceback: boom\n----- rank 0 (log tail) -----\nfine\n"
    ) in capsys.readouterr().err
    assert driver.instances[0].stopped and _gone(ranks.segments_seen)


def test_demo_interrupted_stops_the_engine_removes_the_segments_and_exits_130(driver, capsys) -> None:
    ranks = FakeRanks(error=KeyboardInterrupt())
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", ranks):
        assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "demo: interrupted; every rank stopped and the shared memory was removed\n"
    assert driver.instances[0].stopped and _gone(ranks.segments_seen) and len(ranks.segments_seen) == 2


# --- bench ------------------------------------------------------------------------------------------------------

PATHS = ("legacy", "gloo", "gloo_deadline", "shm")
RESULTS = [
    {"rank": rank, "samples_ns": {name: [(900 - 100 * i + rank) * 1000] * 2 for i, name in enumerate(PATHS)}}
    for rank in (0, 1)
]
LATE_RESULTS = [
    {
        "rank": 0,
        "stamps_ns": {"shm": [1_000_000, 2_000_000], "gloo": [5_000_000, 6_000_000]},
        "publish_ns": {"shm": [1000, 3000], "gloo": [90_000, 110_000]},
        "cpu_s": {"shm": 0.0, "gloo": 0.0},
        "wall_s": {"shm": 1.0, "gloo": 1.0},
        "wait": ["futex", "SYS_futex 202 on x86_64"],
        "floor": "futex is Linux-only",
    },
    {
        "rank": 1,
        "stamps_ns": {"shm": [1_050_000, 2_070_000], "gloo": [5_200_000, 6_300_000]},
        "publish_ns": {"shm": [], "gloo": []},
        "cpu_s": {"shm": 0.05, "gloo": 0.04},
        "wall_s": {"shm": 1.0, "gloo": 1.0},
        "wait": ["futex", "SYS_futex 202 on x86_64"],
        "floor": "futex is Linux-only",
    },
]
JITTER_RESULTS = [
    {
        "rank": rank,
        "samples_ns": {"nosync": [300_000], "gloo": [390_000], "shm": [330_000], "shm_lookahead": [310_000]},
        "work_us_mean": 300.0,
    }
    for rank in (0, 1)
]


def _report(**overrides: object) -> dict:
    fields = {"nranks": 2, "iters": 5000, "warmup": 200, "backend": "gloo", "paddle_version": paddle.__version__}
    return build_latency_report(RESULTS, **{**fields, **overrides})


@pytest.fixture
def gloo():
    with mock.patch.object(bench, "pick_backend", return_value="gloo") as pick:
        yield pick


def _jitter_table() -> str:
    report = reports.build_jitter_report(
        JITTER_RESULTS, nranks=2, iters=5000, warmup=200, paddle_version=paddle.__version__
    )
    return reports.format_jitter_report(report)


def _late_table() -> str:
    report = reports.build_late_report(
        LATE_RESULTS, nranks=2, iters=5000, warmup=200, late_ms=2.0, paddle_version=paddle.__version__
    )
    return reports.format_late_report(report)


def test_bench_src_late_runs_the_late_ranks_and_prints_the_wake_table(gloo, capsys) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=LATE_RESULTS) as run:
        assert cli.main(["bench", "--src-late", "2"]) == 0
    run.assert_called_once_with(
        "fastdeploy_patch.cli.bench.late_src:late_rank",
        2,
        kwargs={"iters": 5000, "warmup": 200, "late_ms": 2.0},
        # Each timed step sleeps 2 ms on each of the three paths, with a quarter to spare; warm-up steps do not.
        timeout=pytest.approx(120.0 + 5200 * 0.02 + 5000 * 3 * 1.25 * 0.002),
        backend="gloo",
    )
    captured = capsys.readouterr()
    assert captured.out == _late_table() + "\n"
    assert captured.err == "bench: 2 ranks (gloo), 200 warm-up + 5000 steps with the src 2 ms late per path...\n"


def test_bench_src_late_json_prints_the_late_report(gloo, capsys) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=LATE_RESULTS):
        assert cli.main(["bench", "--src-late", "0.3", "--json", "--iters", "9", "--warmup", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == reports.build_late_report(
        LATE_RESULTS, nranks=2, iters=9, warmup=1, late_ms=0.3, paddle_version=paddle.__version__
    )


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--jitter"], "argument --src-late: not allowed with --jitter (they are two different benchmarks)"),
        (["--nranks", "3"], "argument --src-late: runs on exactly 2 ranks (one src, one reader), got --nranks 3"),
        (["--plot", "x.png"], "argument --src-late: --plot draws per-step latency paths only; leave it out"),
    ],
)
def test_bench_src_late_refuses_flags_it_cannot_honour_before_starting_ranks(capsys, extra, says) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks") as run, pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--src-late", "2", *extra])
    assert exit_.value.code == 2
    run.assert_not_called()
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "target", "results", "table", "what"),
    [
        ([], "latency:latency_rank", RESULTS, lambda: format_latency_report(_report()), "timed steps"),
        (["--jitter"], "jitter:jitter_rank", JITTER_RESULTS, _jitter_table, "loop steps with per-rank CPU work"),
    ],
)
def test_bench_runs_every_rank_and_prints_its_table(gloo, capsys, extra, target, results, table, what) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=results) as run:
        assert cli.main(["bench", *extra]) == 0
    gloo.assert_called_once_with(2)
    run.assert_called_once_with(
        f"fastdeploy_patch.cli.bench.{target}",
        2,
        kwargs={"iters": 5000, "warmup": 200},
        timeout=pytest.approx(120.0 + 5200 * 0.02),
        backend="gloo",
    )
    captured = capsys.readouterr()
    assert captured.out == table() + "\n"
    assert captured.err == f"bench: 2 ranks (gloo), 200 warm-up + 5000 {what} per path...\n"


def test_bench_json_prints_one_json_object_and_nothing_else(capsys) -> None:
    with (
        mock.patch.object(bench, "pick_backend", return_value="nccl"),
        mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=RESULTS) as run,
    ):
        argv = ["bench", "--nranks", "3", "--iters", "10", "--warmup", "0", "--json", "--timeout", "9"]
        assert cli.main(argv) == 0
    assert run.call_args.kwargs == {"kwargs": {"iters": 10, "warmup": 0}, "timeout": 9.0, "backend": "nccl"}
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report == _report(nranks=3, iters=10, warmup=0, backend="nccl")
    assert list(report["ratios"]) == ["legacy_over_gloo", "gloo_over_shm", "legacy_over_shm"]


def test_bench_jitter_json_prints_the_jitter_report(gloo, capsys) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=JITTER_RESULTS):
        assert cli.main(["bench", "--jitter", "--json", "--iters", "7", "--warmup", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == reports.build_jitter_report(
        JITTER_RESULTS, nranks=2, iters=7, warmup=0, paddle_version=paddle.__version__
    )
    assert report["mode"] == "jitter"


def test_bench_plot_without_matplotlib_fails_before_starting_ranks(gloo, capsys) -> None:
    with (
        mock.patch.object(reports, "load_pyplot", side_effect=RuntimeError("--plot needs matplotlib, ...")),
        mock.patch("fastdeploy_patch.testing.launcher.run_ranks") as run,
    ):
        assert cli.main(["bench", "--plot", "out.png"]) == 1
    run.assert_not_called()
    assert capsys.readouterr().err == "bench: --plot needs matplotlib, ...\n"


def test_bench_plot_saves_the_distributions(gloo, capsys) -> None:
    plt = object()
    with (
        mock.patch.object(reports, "load_pyplot", return_value=plt),
        mock.patch.object(reports, "plot_report") as plot,
        mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=RESULTS),
    ):
        assert cli.main(["bench", "--plot", "out.png"]) == 0
    plot.assert_called_once_with(RESULTS, _report(), "out.png", plt)
    assert capsys.readouterr().err.endswith("bench: distributions saved to out.png\n")


def test_bench_without_plot_never_loads_matplotlib(gloo) -> None:
    with (
        mock.patch.object(reports, "load_pyplot") as load,
        mock.patch.object(reports, "plot_report") as plot,
        mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=RESULTS),
    ):
        assert cli.main(["bench", "--json"]) == 0
    load.assert_not_called()
    plot.assert_not_called()


def test_bench_fails_when_a_rank_fails(gloo, capsys) -> None:
    error = RankFailed(rank=0, nranks=2, target="m:f", returncode=1, reports={0: "Traceback: gloo", 1: "fine"})
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", side_effect=error):
        assert cli.main(["bench", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bench: FAILED: rank 0 of 2 failed in m:f: it exited before replying, exit code 1\n" in captured.err
    assert "----- rank 0 -----\nTraceback: gloo\n----- rank 1 (log tail) -----\nfine\n" in captured.err


def test_bench_interrupted_exits_130(gloo, capsys) -> None:
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", side_effect=KeyboardInterrupt):
        assert cli.main(["bench"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith("bench: interrupted; every rank stopped\n")
