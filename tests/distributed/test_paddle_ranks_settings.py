"""The paddle_ranks plugin's settings on real Paddle ranks, in an inner pytest session: ``--paddle-ranks-timeout``
bounds a hanging call without touching the test, and ``--paddle-ranks-keep-logs`` keeps every rank's whole log of
the failed call, one file per worker, test, call and rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdeploy_patch.testing.leak_guard import RUN_TAG, RUN_TAG_VAR

INNER_TIMEOUT_S = 200
"""A hang guard for the inner session: pytest, two Paddle ranks' start on a loaded 2-core host, and the call's 3 s."""

INNER = """
import os
import time


def hang():
    print(f"rank {os.environ['PADDLE_TRAINER_ID']} is in the hang", flush=True)
    time.sleep(600)


def test_hangs(paddle_ranks):
    paddle_ranks.run(hang, 2)
"""

PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q")


@pytest.mark.timeout(INNER_TIMEOUT_S + 30)
def test_a_hanging_call_fails_at_the_sessions_timeout_and_both_ranks_logs_are_kept(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.pop("PYTHONPATH", None)
    # The inner session belongs to this run: a rank of its that outlived it would fail this test's leak guard.
    env[RUN_TAG_VAR] = RUN_TAG
    started = time.monotonic()
    done = subprocess.run(
        [
            *PYTEST,
            f"--timeout={INNER_TIMEOUT_S}",
            "test_inner.py",
            "--paddle-ranks-timeout",
            "3",
            "--paddle-ranks-keep-logs",
            "logs",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT_S + 20,
    )
    took = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "ranks [0, 1] of 2 hung in test_inner:hang for 3 s; their stacks:" in out, out
    assert "1 failed" in out and "Timeout" not in out, out
    logs = sorted((tmp_path / "logs").iterdir())
    assert [path.name for path in logs] == [
        f"main__test_inner.py_test_hangs__call1__rank{rank}.log" for rank in (0, 1)
    ]
    for rank, path in enumerate(logs):
        text = path.read_text()
        assert f"rank {rank} is in the hang\n" in text
        # The whole log: from the rank's start, down to the stack it wrote when the call timed out.
        assert re.search(r'File ".*test_inner\.py", line \d+ in hang', text), text
    print(f"inner session: {took:.1f} s")
