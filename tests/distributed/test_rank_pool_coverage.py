"""Coverage inside pool ranks: with ``[tool.coverage.run] patch = ["subprocess"]`` every pool rank is measured, and
its per-process data file gains each call's lines as the call ends, so a rank SIGKILLed in a later call keeps every
line it ran before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from coverage import CoverageData

INNER_TESTS = """
import json
import os
import re
import signal
from pathlib import Path

import pytest


def first_call():
    marker = "first"  # line FIRST
    return os.getpid()


def second_call():
    marker = "second"  # line SECOND
    return marker


def killed():
    import paddle.distributed as dist

    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "rank 0"


@pytest.mark.paddle_ranks_reuse("a rank that served two calls is killed in the third")
def test_two_calls_then_a_rank_is_killed(paddle_ranks):
    pids = paddle_ranks.run(first_call, 2)
    Path("pids.json").write_text(json.dumps(pids))
    assert paddle_ranks.run(second_call, 2) == ["second", "second"]
    expected = "rank 1 of 2 failed in test_measured:killed: it exited before replying, exit code -9 (SIGKILL)"
    with pytest.raises(pytest.fail.Exception, match=re.escape(expected)):
        paddle_ranks.run(killed, 2)
"""


def _line_of(source: str, marker: str) -> int:
    return next(number for number, line in enumerate(source.splitlines(), 1) if marker in line)


@pytest.mark.timeout(300)
def test_a_rank_killed_after_two_calls_keeps_both_calls_lines(tmp_path: Path) -> None:
    (tmp_path / "test_measured.py").write_text(INNER_TESTS)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.coverage.run]\nsource = ["{tmp_path}"]\npatch = ["subprocess"]\nbranch = true\n'
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("COVERAGE_")}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "coverage",
            "run",
            f"--data-file={tmp_path / '.coverage'}",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_measured.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = _line_of(INNER_TESTS, "line FIRST"), _line_of(INNER_TESTS, "line SECOND")
    for pid in json.loads((tmp_path / "pids.json").read_text()):
        files = list(tmp_path.glob(f".coverage.*pid{pid}.*"))
        assert len(files) == 1, sorted(p.name for p in tmp_path.glob(".coverage*"))
        data = CoverageData(basename=str(files[0]))
        data.read()
        lines = data.lines(str(tmp_path / "test_measured.py")) or []
        # Rank 1 died by SIGKILL in the third call: no exit handler ran, only the saves after each call.
        assert {first, second} <= set(lines), (pid, sorted(lines))
