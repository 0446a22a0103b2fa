"""Where Paddle is missing, pytest still runs with the paddle_ranks plugin installed: a plain test passes, a
``paddle_gpus`` test skips, the leak guard has nothing to check, and a test that asks for ``paddle_ranks`` errors
(never skips) with what to install.

Runs in ``tox -e nopaddle`` (pytest and the package installed with ``--no-deps``: no Paddle at all) and in the unit
suite, where an import blocker in front of ``sys.meta_path`` hides the installed Paddle from the inner pytest. This
file imports nothing of the package: it must load where the package cannot.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The inner pytest's interpreter: `paddle` (and anything under it) cannot be found, as in an environment without it;
# then pytest, which loads the plugin through its installed entry point.
WITHOUT_PADDLE = """\
import importlib.abc, sys

class NoPaddle(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "paddle" or name.startswith("paddle."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPaddle())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""

INNER = """\
import sys

import pytest


def test_plain():
    assert "paddle" not in sys.modules


@pytest.mark.paddle_gpus(10000)
def test_on_many_gpus():
    raise AssertionError("ran without 10000 GPUs")


def test_ranks(paddle_ranks):
    raise AssertionError("the fixture gave something without Paddle")
"""


def run_inner(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "COV_CORE_"))}
    env["PYTHONPATH"] = ""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PADDLE, "-p", "no:cacheprovider", "-p", "no:xdist", "-rA", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(150)
def test_without_paddle_a_plain_test_passes_and_the_fixtures_test_errors_with_what_to_install(tmp_path: Path) -> None:
    done = run_inner(tmp_path, "--paddle-ranks-check-leaks", "test_inner.py")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert re.search(r"\b1 passed, 1 skipped, 1 error\b", out), out
    assert "PASSED test_inner.py::test_plain" in out
    assert re.search(r"SKIPPED \[1\] test_inner.py:\d+: needs 10000 GPU\(s\), \d+ visible", out), out
    assert "ERROR at setup of test_ranks" in out, out
    # What to install, from the plugin, then why the import failed (the package's own message).
    hint = "the paddle_ranks fixture needs fastdeploy-patch with Paddle: pip install 'fastdeploy-patch[cpu,test]'"
    assert hint in out
    assert "Importing it failed: fastdeploy_patch needs PaddlePaddle 3.3." in out


@pytest.mark.timeout(150)
def test_without_paddle_the_options_and_markers_are_documented(tmp_path: Path) -> None:
    helped = run_inner(tmp_path, "--help")
    assert helped.returncode == 0, helped.stderr
    for option in ("--paddle-ranks-timeout=SECONDS", "--paddle-ranks-keep-logs=DIR", "--paddle-ranks-max-pools=N"):
        assert option in helped.stdout
    assert "--paddle-ranks-check-leaks" in helped.stdout
    assert re.search(r"paddle_ranks_timeout \(string\):", helped.stdout), helped.stdout
    assert re.search(r"paddle_ranks_check_leaks \(bool\):", helped.stdout), helped.stdout
    markers = run_inner(tmp_path, "--markers")
    assert markers.returncode == 0, markers.stderr
    assert "@pytest.mark.paddle_gpus(n): skip the test on a machine with fewer than n visible GPUs" in markers.stdout
    assert "@pytest.mark.started_early(fn, nranks, *, kwargs, timeout, devices, env):" in markers.stdout
    assert "@pytest.mark.paddle_ranks_reuse(reason): the test's paddle_ranks calls reuse warm pools" in markers.stdout
