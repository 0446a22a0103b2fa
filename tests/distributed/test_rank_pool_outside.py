"""The user guide's paddle_ranks example, run as a user would: copied out of docs/paddle_ranks.md into a temporary
directory outside this repository (no conftest, no PYTHONPATH to the checkout), collected by a pytest that finds the
plugin only through the installed package's entry point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "paddle_ranks.md"
START, END = "<!-- paddle_ranks example -->", "<!-- end of paddle_ranks example -->"


def guide_example() -> tuple[str, str]:
    """The example's file name (from its first line) and its source, exactly as the guide shows them."""
    block = GUIDE.read_text(encoding="utf-8").split(START, 1)[1].split(END, 1)[0]
    source = re.fullmatch(r"\s*```python\n(.*)```\s*", block, re.S).group(1)
    name = re.match(r"# (test_\w+)\.py: run with `pytest test_\w+\.py`\n", source).group(1)
    return name, source


def test_the_guide_example_passes_from_a_directory_outside_the_repository(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    name, source = guide_example()
    pytester.makepyfile(**{name: source})
    assert GUIDE.parents[1] not in pytester.path.parents
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"{name}.py", timeout=300)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["paddle_ranks: 3 pool starts, 3 calls served, 0 recycles"])


OTHER_FILE = """
import json
import os
from pathlib import Path

from test_allreduce import sum_of_ranks


def test_another_file_on_whichever_worker_gets_it(paddle_ranks):
    results = paddle_ranks.run(sum_of_ranks, 2, kwargs={"scale": 3})
    assert [r["sum"] for r in results] == [3, 3]
    Path("worker-" + os.environ["PYTEST_XDIST_WORKER"]).write_text(json.dumps([r["pid"] for r in results]))
"""


def test_the_plugin_under_xdist_keeps_pools_per_worker_and_sums_their_summary(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    name, source = guide_example()
    pytester.makepyfile(**{name: source, "test_other": OTHER_FILE})
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile", "--rootdir", str(pytester.path), timeout=300
    )
    result.assert_outcomes(passed=3)
    workers = sorted(p.name for p in pytester.path.glob("worker-*"))
    assert workers in (["worker-gw0"], ["worker-gw1"]), workers
    # Each worker started a fresh world per call of its files (3 in the guide's, 1 in the other): the controller's one
    # line adds them up.
    result.stdout.fnmatch_lines(["paddle_ranks: 4 pool starts, 4 calls served, 0 recycles"])


HERMETIC_FILE = r"""
import os
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import pytest


def leave_state():
    import paddle

    os.environ["FDP_LEFT"] = "x"
    os.chdir("/")
    sys.path.insert(0, "/fdp-left")
    warnings.simplefilter("error")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    random.seed(1234)
    np.random.seed(1234)
    paddle.seed(1234)
    paddle.set_default_dtype("float64")
    paddle.set_flags({"FLAGS_check_nan_inf": True})
    paddle.enable_static()
    return os.getpid()


def look():
    import paddle

    # Under a leaked "error" filter this would raise; in a fresh rank it is only printed to the rank's log.
    warnings.warn("a warning a later test meets", UserWarning)
    return {
        "pid": os.getpid(),
        "env": os.environ.get("FDP_LEFT"),
        "cwd": os.getcwd(),
        "left_path": "/fdp-left" in sys.path,
        "sigterm_ignored": signal.getsignal(signal.SIGTERM) is signal.SIG_IGN,
        "draws": (random.random(), float(np.random.rand()), paddle.rand([2]).numpy().tolist()),
        "dtype": paddle.get_default_dtype(),
        "nan_check": paddle.get_flags(["FLAGS_check_nan_inf"])["FLAGS_check_nan_inf"],
    }


def leave_a_thread():
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    return os.getpid()


def echo(value):
    return value


def a_tensor():
    import paddle

    return paddle.to_tensor([1.0])


@pytest.mark.paddle_ranks_reuse("what a reused pool puts back after a call")
def test_a_each_call_starts_as_a_fresh_rank_would(paddle_ranks):
    fresh = paddle_ranks.run(look, 2)
    pids = [r["pid"] for r in fresh]
    assert paddle_ranks.run(leave_state, 2) == pids
    again = paddle_ranks.run(look, 2)
    assert again == fresh
    assert fresh[0]["env"] is None and fresh[0]["cwd"] == os.getcwd() and fresh[0]["dtype"] == "float32"
    assert not fresh[0]["nan_check"] and not fresh[0]["left_path"] and not fresh[0]["sigterm_ignored"]


def test_b_a_thread_left_running_recycles_the_ranks(paddle_ranks):
    pids = paddle_ranks.run(leave_a_thread, 2, reuse=True)
    assert not set(pids) & {r["pid"] for r in paddle_ranks.run(look, 2, reuse=True)}


def test_d_by_default_nothing_a_call_changes_reaches_the_next(paddle_ranks):
    clean = paddle_ranks.run(look, 2)
    left = paddle_ranks.run(leave_state, 2)
    after = paddle_ranks.run(look, 2)
    assert not set(left) & {r["pid"] for r in after}
    # The seeds leave_state set stayed in its ranks: the next world draws as it would have anyway.
    random.seed(1234)
    np.random.seed(1234)
    assert all(r["draws"][:2] != (random.random(), float(np.random.rand())) for r in after)
    same = ("env", "cwd", "left_path", "sigterm_ignored", "dtype", "nan_check")
    assert [{k: r[k] for k in same} for r in after] == [{k: r[k] for k in same} for r in clean]


def test_c_values_cross_as_pickles(paddle_ranks):
    value = {1: (2, 3), (4,): {5, 6}, "b": b"\x00\xff", "a": np.arange(6, dtype=np.float16).reshape(2, 3)}
    for result in paddle_ranks.run(echo, 2, kwargs={"value": value}):
        assert result.keys() == value.keys() and result[1] == (2, 3) and result[(4,)] == {5, 6}
        assert result["b"] == b"\x00\xff" and result["a"].dtype == np.float16 and result["a"].shape == (2, 3)
    big = np.arange(64 << 20, dtype=np.uint8)
    assert all(np.array_equal(result, big) for result in paddle_ranks.run(echo, 2, kwargs={"value": big}))
    with pytest.raises(TypeError, match=r"^the test process cannot send kwargs\['value'\] to the ranks: a generator"):
        paddle_ranks.run(echo, 2, kwargs={"value": (i for i in ())})
    with pytest.raises(pytest.fail.Exception) as refused:
        paddle_ranks.run(a_tensor, 2)
    assert "cannot send what test_hermetic:a_tensor returned to the test process" in str(refused.value)
    assert "return tensor.numpy() instead" in str(refused.value)
"""


def test_from_outside_each_call_is_hermetic_and_values_are_pickles(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    pytester.makepyfile(test_hermetic=HERMETIC_FILE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", timeout=300)
    result.assert_outcomes(passed=4)
    # a: one warm pool for its 3 calls; b: a's pool, which its thread retires, then another; c: a fresh world per
    # call (the refused send starts none); d: 3 fresh worlds.
    result.stdout.fnmatch_lines(
        ["paddle_ranks: 8 pool starts, 11 calls served, 2 recycles (rank raised: 1, state left behind: 1 thread: 1)"]
    )
