"""Paddle's "No ccache found" import warning is silenced in the command and in every rank, and nothing else is.

The processes here run with PYTHONWARNINGS removed from their environment, since tox sets it to hide that warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastdeploy_patch.testing.launcher import RANK_BOOTSTRAP

REPO = Path(__file__).resolve().parents[2]
CCACHE_MODULE = "paddle.utils.cpp_extension.extension_utils"
CCACHE_MESSAGE = "No ccache found. Please be aware that recompiling all source files may be required."


def _env_without_warning_filters() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_the_command_prints_no_ccache_warning() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastdeploy_patch", "smoke", "--nranks", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env_without_warning_filters(),
    )
    assert done.returncode == 2
    assert "ccache" not in done.stderr
    # Nothing but the usage and the one error line.
    assert done.stderr.startswith("usage: fastdeploy-patch smoke")
    assert len(done.stderr.rstrip("\n").splitlines()) == 2


def test_a_rank_prints_no_ccache_warning(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"target": "tests.unit.rank_targets:echo", "kwargs": {"value": 3}}))
    result = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-c", RANK_BOOTSTRAP, str(spec), str(result)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env_without_warning_filters(), "PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(result.read_text()) == {"value": 3, "rank": 0}
    assert done.stderr == ""


_CASES = [
    (CCACHE_MESSAGE, CCACHE_MODULE, "UserWarning", False),
    ("Some other warning from the same module", CCACHE_MODULE, "UserWarning", True),
    (CCACHE_MESSAGE, "someone.else", "UserWarning", True),
    (CCACHE_MESSAGE, CCACHE_MODULE + "_v2", "UserWarning", True),
    (CCACHE_MESSAGE, CCACHE_MODULE, "RuntimeWarning", True),
]

# pytest discards warning filters installed while it imports test modules, so the check runs in a fresh process.
_PROBE = """
import json, sys, warnings
import fastdeploy_patch
shown = []
for message, module, category, _ in json.loads(sys.argv[1]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, getattr(__builtins__, category), "x.py", 1, module=module, registry={})
    shown.append(bool(caught))
print(json.dumps(shown))
"""


def test_only_that_one_warning_is_silenced() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(_CASES)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env_without_warning_filters(),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [shown for *_, shown in _CASES]
