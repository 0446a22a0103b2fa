"""fastdeploy_patch.testing.rank_state in this process: what a call changes is put back exactly, and what cannot be
(threads, child processes) is named."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest

from fastdeploy_patch.testing import pickles, rank_state


@pytest.fixture
def baseline(monkeypatch: pytest.MonkeyPatch):
    # The fixture's own restore after the test's is the safety net: a failing assertion must not leak either.
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    taken = rank_state.Baseline.take()
    yield taken
    taken.restore()


def test_env_cwd_path_warnings_and_python_rngs_are_put_back(baseline, tmp_path: Path) -> None:
    expected_random, expected_numpy = random.random(), np.random.rand()
    baseline.restore()
    os.environ["FDP_STATE_ADDED"] = "1"
    os.environ.pop("PATH")
    os.chdir(tmp_path)
    sys.path.insert(0, "/nowhere")
    warnings.simplefilter("error")
    random.seed(1234)
    np.random.seed(1234)
    baseline.restore()
    assert "FDP_STATE_ADDED" not in os.environ and os.environ["PATH"] == baseline.env["PATH"]
    assert os.getcwd() == baseline.cwd and sys.path == baseline.path
    assert warnings.filters == baseline.filters
    # Every call draws what the first call drew: the sequence the rank joined with, not one a call seeded.
    assert (random.random(), np.random.rand()) == (expected_random, expected_numpy)


def warn_here() -> None:
    warnings.warn("fdp once per registry", UserWarning, stacklevel=1)


def test_the_registries_that_remember_shown_warnings_are_forgotten(baseline) -> None:
    warnings.simplefilter("default")
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("default")
        warn_here()
        warn_here()
    assert len(first) == 1
    baseline.restore()
    warnings.simplefilter("default")
    shown: list[warnings.WarningMessage] = []
    real_show = warnings.showwarning
    warnings.showwarning = lambda *args, **kwargs: shown.append(args[0])
    try:
        warn_here()
    finally:
        warnings.showwarning = real_show
    # A fresh rank would show it: the registry of the earlier call's warning is gone with the filters it was under.
    assert [str(message) for message in shown] == ["fdp once per registry"]


def test_signal_handlers_are_put_back_and_faulthandler_answers_sigusr1_again(baseline) -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    for signum in rank_state.HANDLED_SIGNALS:
        signal.signal(signum, mine)
    registered: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rank_state.faulthandler, "register", lambda signum, all_threads: registered.append(signum))
        mp.setattr(rank_state.faulthandler, "unregister", lambda signum: None)
        baseline.restore()
    assert {signum: signal.getsignal(signum) for signum in rank_state.HANDLED_SIGNALS} == baseline.handlers
    assert registered == [signal.SIGUSR1]


def test_paddles_dtype_mode_device_flags_and_rng_are_put_back(baseline) -> None:
    expected = paddle.rand([3]).numpy()
    baseline.restore()
    paddle.set_default_dtype("float64")
    paddle.enable_static()
    paddle.set_flags({"FLAGS_check_nan_inf": True})
    paddle.set_flags({"FLAGS_check_nan_inf": False, "FLAGS_benchmark": True})
    paddle.set_flags({"FLAGS_benchmark": True})
    with pytest.MonkeyPatch.context() as mp:
        devices: list[str] = []
        mp.setattr(paddle.device, "get_device", lambda: "gpu:1")
        mp.setattr(paddle.device, "set_device", devices.append)
        baseline.restore()
    assert devices == ["cpu"]
    assert (paddle.get_default_dtype(), paddle.in_dynamic_mode()) == ("float32", True)
    assert paddle.get_flags(["FLAGS_check_nan_inf", "FLAGS_benchmark"]) == {
        "FLAGS_check_nan_inf": False,
        "FLAGS_benchmark": False,
    }
    paddle.seed(1234)
    baseline.restore()
    assert (paddle.rand([3]).numpy() == expected).all()
    # The recorder wraps paddle.set_flags once, however many baselines are taken.
    assert rank_state.Baseline.take().paddle.flags is baseline.paddle.flags


def test_a_static_baseline_is_put_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    paddle.enable_static()
    try:
        static = rank_state.Baseline.take()
    finally:
        paddle.disable_static()
    static.restore()
    assert not paddle.in_dynamic_mode()
    paddle.disable_static()


def test_without_numpy_and_paddle_only_pythons_own_state_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "numpy")
    monkeypatch.delitem(sys.modules, "paddle")
    bare = rank_state.Baseline.take()
    assert (bare.numpy_state, bare.paddle) == (None, None)
    bare.restore()


def test_threads_and_child_processes_left_running_are_named() -> None:
    running = rank_state.Running.now()
    assert running.left_behind() == []
    stop = threading.Event()
    quick = threading.Thread(target=lambda: None)
    quick.start()  # ends by itself: not left behind
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert running.left_behind() == ["2 threads", "1 child process"]
        assert running.left_behind(threads=False) == ["1 child process"]
        # The resource tracker a shared-memory segment starts, once per process, is not the call's to leave.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rank_state.resource_tracker._resource_tracker, "_pid", child.pid)
            assert running.left_behind() == ["2 threads"]
        stop.set()
        child.kill()
        child.wait()
        for thread in threads:
            thread.join()
        assert rank_state.Running.now().children == running.children
    finally:
        stop.set()
        child.kill()
        child.wait()


def test_a_zombie_a_vanished_child_and_no_child_at_all_count_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert child.pid not in rank_state.children()
    finally:
        child.wait()
    # Listed as a child a moment before it was reaped: gone by the time its state is read.
    with monkeypatch.context() as mp:
        mp.setattr(rank_state.procfs, "children", lambda pid: [child.pid])
        assert rank_state.children() == set()

    def no_children(*args: object) -> None:
        raise ChildProcessError

    monkeypatch.setattr(rank_state.os, "waitid", no_children)
    assert rank_state.children() == set()


def test_values_are_pickled_and_a_tensor_or_an_unpicklable_value_is_refused_by_name() -> None:
    value = {1: (2, b"3"), frozenset({4}): np.arange(6, dtype=np.int16).reshape(2, 3)}
    back = pickles.loads(pickles.dumps(value, "here"))
    assert back.keys() == value.keys() and back[1] == (2, b"3")
    array = back[frozenset({4})]
    assert (array.dtype, array.shape, array.tolist()) == (np.int16, (2, 3), [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(TypeError) as refused:
        pickles.dumps({"t": paddle.to_tensor([1.0])}, "rank 1 cannot send it")
    assert str(refused.value) == (
        "rank 1 cannot send it: a dict that cannot be pickled (TypeError: a paddle.Tensor does not cross to the test "
        "process: return tensor.numpy() instead)"
    )
