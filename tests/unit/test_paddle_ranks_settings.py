"""The paddle_ranks plugin's settings and markers (``pytest_paddle_ranks``): each option over its ini twin over the
default, bad values as usage errors naming the option, and GPUs counted without Paddle."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import pytest_paddle_ranks as entry
from fastdeploy_patch import procfs

REPO = Path(__file__).resolve().parents[2]


class FakeConfig:
    """What ``read_settings`` reads: command-line values by dest, ini values by name (unset: pytest's defaults)."""

    def __init__(self, options: dict | None = None, ini: dict | None = None) -> None:
        self.options = {
            "paddle_ranks_timeout": None,
            "paddle_ranks_keep_logs": None,
            "paddle_ranks_max_pools": None,
            "paddle_ranks_check_leaks": None,
            **(options or {}),
        }
        self.ini = {"paddle_ranks_timeout": "", "paddle_ranks_check_leaks": False, **(ini or {})}

    def getoption(self, name: str) -> object:
        return self.options[name]

    def getini(self, name: str) -> object:
        return self.ini[name]


def test_without_settings_the_defaults_hold() -> None:
    assert entry.read_settings(FakeConfig()) == entry.Settings(
        timeout=90.0, keep_logs=None, max_pools=2, check_leaks=False
    )


def test_the_command_line_wins_over_the_ini_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = FakeConfig(
        {
            "paddle_ranks_timeout": 3.0,
            "paddle_ranks_keep_logs": "logs",
            "paddle_ranks_max_pools": 1,
            "paddle_ranks_check_leaks": True,
        },
        {"paddle_ranks_timeout": "7", "paddle_ranks_check_leaks": False},
    )
    assert entry.read_settings(config) == entry.Settings(
        timeout=3.0, keep_logs=tmp_path / "logs", max_pools=1, check_leaks=True
    )


def test_the_ini_file_sets_the_timeout_and_the_leak_guard() -> None:
    settings = entry.read_settings(FakeConfig(ini={"paddle_ranks_timeout": "7.5", "paddle_ranks_check_leaks": True}))
    assert (settings.timeout, settings.check_leaks) == (7.5, True)


@pytest.mark.parametrize(
    ("options", "ini", "message"),
    [
        ({"paddle_ranks_timeout": 0.0}, {}, "--paddle-ranks-timeout must be a finite number of seconds > 0, got 0.0"),
        ({"paddle_ranks_timeout": math.inf}, {}, "--paddle-ranks-timeout must be a finite number of seconds > 0"),
        ({}, {"paddle_ranks_timeout": "-1"}, "ini paddle_ranks_timeout must be a finite number of seconds > 0, got"),
        ({}, {"paddle_ranks_timeout": "soon"}, "ini paddle_ranks_timeout must be a number of seconds, got 'soon'"),
        ({"paddle_ranks_max_pools": 0}, {}, "--paddle-ranks-max-pools must be at least 1, got 0"),
    ],
)
def test_a_bad_setting_is_a_usage_error_naming_it(options: dict, ini: dict, message: str) -> None:
    with pytest.raises(pytest.UsageError) as error:
        entry.read_settings(FakeConfig(options, ini))
    assert str(error.value).startswith(message)


def fake_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, proc: int | None, dev: int) -> None:
    """``proc`` GPU folders under a fake /proc/driver/nvidia/gpus (``None``: no driver folder), ``dev`` device files
    /dev/nvidia0.. beside /dev/nvidiactl, which is no GPU."""
    gpus = tmp_path / "gpus"
    if proc is not None:
        gpus.mkdir()
        for index in range(proc):
            (gpus / f"0000:{index:02x}:00.0").mkdir()
    devices = tmp_path / "dev"
    devices.mkdir()
    for name in [f"nvidia{index}" for index in range(dev)] + ["nvidiactl", "nvidia-uvm"]:
        (devices / name).touch()
    monkeypatch.setattr(entry, "_NVIDIA_GPUS", gpus)
    monkeypatch.setattr(entry, "_DEV", devices)


@pytest.mark.parametrize(
    ("proc", "dev", "visible", "expected"),
    [
        (None, 0, None, 0),
        (4, 0, None, 4),
        (None, 3, None, 3),
        (4, 8, None, 4),
        (4, 0, "2,3", 2),
        (4, 0, "", 0),
        (4, 0, "0,-1,2", 1),
        (2, 0, "0,1,2,3", 2),
        (4, 0, "GPU-abc, GPU-def", 2),
    ],
)
def test_gpus_are_the_drivers_narrowed_by_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, proc: int | None, dev: int, visible: str | None, expected: int
) -> None:
    fake_gpus(monkeypatch, tmp_path, proc, dev)
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert entry.visible_gpus(environ) == expected


def an_item(nodeid: str, *marks: pytest.MarkDecorator) -> SimpleNamespace:
    added: list = []

    def closest(name: str) -> object:
        return next((mark.mark for mark in marks if mark.name == name), None)

    return SimpleNamespace(nodeid=nodeid, get_closest_marker=closest, add_marker=added.append, added=added)


def test_a_test_asking_for_more_gpus_than_there_are_is_skipped_with_the_counts() -> None:
    counted: list[int] = []

    def count() -> int:
        counted.append(1)
        return 2

    items = [an_item("a", pytest.mark.paddle_gpus(2)), an_item("b", pytest.mark.paddle_gpus(3)), an_item("c")]
    entry.skip_short_of_gpus(items, count)
    assert items[0].added == [] and items[2].added == []
    (skip,) = items[1].added
    assert (skip.name, skip.args, skip.kwargs) == ("skipif", (True,), {"reason": "needs 3 GPU(s), 2 visible"})
    assert counted == [1]
    entry.skip_short_of_gpus([an_item("d")], lambda: pytest.fail("counted GPUs with no test asking"))


@pytest.mark.parametrize("args", [(), (1, 2), ("2",), (True,)])
def test_a_gpu_marker_without_one_integer_is_a_usage_error(args: tuple) -> None:
    with pytest.raises(pytest.UsageError, match=r"^t: paddle_gpus takes one integer \(GPUs needed\), got "):
        entry.skip_short_of_gpus([an_item("t", pytest.mark.paddle_gpus(*args))], lambda: 0)


LEAKING = """
import os
import subprocess
import sys

from fastdeploy_patch.testing.leak_guard import RUN_TAG, RUN_TAG_VAR


def test_leaves_a_process_of_this_run():
    env = {**os.environ, RUN_TAG_VAR: RUN_TAG}
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)


def test_leaves_nothing():
    pass
"""


@pytest.mark.timeout(120)
def test_the_ini_switch_puts_every_test_under_the_leak_guard(tmp_path: Path) -> None:
    (tmp_path / "test_leaking.py").write_text(LEAKING)
    (tmp_path / "pytest.ini").write_text("[pytest]\npaddle_ranks_check_leaks = true\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "COV_CORE_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "test_leaking.py"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=100,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert re.search(r"\b2 passed, 1 error\b", out), out
    # The guard killed the process it names (the report may quote its message again in the short summary).
    (pid,) = set(re.findall(r"rank processes outlived the test: \{(\d+): '[^']*time\.sleep\(60\)", out))
    assert "ERROR at teardown of test_leaves_a_process_of_this_run" in out
    assert (now := procfs.stat(int(pid))) is None or now.state == "Z"


def test_the_entry_point_loads_the_top_level_module_which_imports_neither_paddle_nor_the_package() -> None:
    code = (
        "import json, sys, importlib.metadata as m; "
        "ep = [e for e in m.entry_points(group='pytest11') if e.name == 'paddle_ranks'][0]; "
        "plugin = ep.load(); "
        "print(json.dumps([plugin.__name__, sorted({n.split('.')[0] for n in sys.modules} & {'paddle', "
        "'fastdeploy_patch'})]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["pytest_paddle_ranks", []]
