"""The `smoke` subcommand of the CLI, with the ranks faked; and `python -m fastdeploy_patch` as a real process."""

from __future__ import annotations

import runpy
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

import fastdeploy_patch
from fastdeploy_patch import cli
from fastdeploy_patch.testing.launcher import RankFailed

GOOD = [
    {"rank": 0, "received": {"0": 1000, "1": 1001}, "shut_down": [], "after_restart": -7},
    {"rank": 1, "received": {"0": 1000, "1": 1001}, "shut_down": [], "after_restart": -7},
]


def test_smoke_runs_the_smoke_rank_on_each_rank_and_reports_ok(capsys):
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=GOOD) as run:
        assert cli.main(["smoke", "--nranks", "2", "--timeout", "50"]) == 0
    run.assert_called_once_with("fastdeploy_patch.cli.smoke:smoke_rank", 2, timeout=50.0)
    out = capsys.readouterr().out
    assert "rank 1: received {'0': 1000, '1': 1001}, shut down [], after restart -7" in out
    assert out.rstrip().endswith("smoke: OK (2 ranks agree)")


def test_smoke_fails_when_a_rank_saw_something_else(capsys):
    bad = [GOOD[0], {**GOOD[1], "after_restart": 0}]
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=bad):
        assert cli.main(["smoke"]) == 1
    captured = capsys.readouterr()
    assert "smoke: FAILED: rank 1 received 0 after restart, expected -7" in captured.err
    assert "smoke: OK" not in captured.out


def test_smoke_fails_when_a_rank_fails(capsys):
    error = RankFailed(rank=1, nranks=2, target="m:f", returncode=1, reports={0: "fine", 1: "Traceback: boom"})
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", side_effect=error):
        assert cli.main(["smoke"]) == 1
    assert (
        "smoke: FAILED: rank 1 of 2 failed in m:f: it exited before replying, exit code 1\n----- rank 1 -----\n"
        "Traceback: boom\n"
    ) in capsys.readouterr().err


def test_ctrl_c_during_smoke_exits_130_after_the_ranks_are_stopped(capsys):
    with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", side_effect=KeyboardInterrupt):
        assert cli.main(["smoke"]) == 130
    assert capsys.readouterr().err == "smoke: interrupted; every rank stopped\n"


def test_main_turns_sigint_into_keyboard_interrupt_even_when_started_ignoring_it():
    # A shell's background job inherits SIGINT ignored; the CLI must still stop on it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with mock.patch("fastdeploy_patch.testing.launcher.run_ranks", return_value=GOOD):
            assert cli.main(["smoke"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_module_entry_point_exits_with_the_cli_code():
    import fastdeploy_patch.__main__  # noqa: F401 - importing must not run the CLI

    done = subprocess.run(
        [sys.executable, "-m", "fastdeploy_patch", "smoke", "--nranks", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "expected a positive integer, got '0'" in done.stderr


def test_running_the_package_as_main_exits_with_the_cli_code(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fastdeploy_patch", "smoke", "--nranks", "0"])
    # run_path compiles the file itself: run_module would load it through whichever import hook finds the package
    # first, and under `python -m pytest` that is pytest's assertion rewriter, which runpy cannot load from.
    main_file = Path(fastdeploy_patch.__file__).with_name("__main__.py")
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(main_file), run_name="__main__")
    assert exited.value.code == 2
    assert "argument --nranks: expected a positive integer, got '0'" in capsys.readouterr().err
