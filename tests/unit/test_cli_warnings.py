"""Paddle's "No ccache found" import warning is silenced in the command and in every rank, and nothing else is;
importing the package alone silences nothing.

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
from fastdeploy_patch.paddle_warnings import silence_ccache_warning
silence_ccache_warning()
silence_ccache_warning()
shown = [sum(f[0] == "ignore" and f[1] is not None and f[1].pattern == "No ccache found" for f in warnings.filters)]
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
    # One filter however often it is installed, then exactly the cases expected to show.
    assert json.loads(done.stdout) == [1] + [shown for *_, shown in _CASES]


# Paddle installs filters of its own on import, so the baseline is taken after importing it, without the ccache
# hint that import would otherwise print first.
_IMPORT_PROBE = """
import json, sys, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import paddle
before = list(warnings.filters)
import fastdeploy_patch
from fastdeploy_patch import ModelWeightsStatus, new_signal_group
import fastdeploy_patch.worker.worker_process, fastdeploy_patch.rl.dynamic_weight_manager
with warnings.catch_warnings(record=True) as caught:
    warnings.warn_explicit(
        "No ccache found.", UserWarning, "x.py", 1, module="paddle.utils.cpp_extension.extension_utils", registry={}
    )
print(json.dumps({"same_filters": warnings.filters == before, "ccache_shown": len(caught)}))
"""


def test_importing_the_package_and_its_api_leaves_the_warning_filters_as_they_were() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env_without_warning_filters(),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"same_filters": True, "ccache_shown": 1}
