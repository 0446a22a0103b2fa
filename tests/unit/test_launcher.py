"""fastdeploy_patch.testing.launcher: argument checks, the environment each rank gets, kill-all on failure and timeout.

Multi-rank control flow runs against fake processes; one-rank runs start real children (no process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import launcher, rank_processes, rank_world
from fastdeploy_patch.testing.launcher import RankFailed, RankTimeout, free_ports, rank_env, run_ranks

REPO = Path(__file__).resolve().parents[2]
CHILD_ENV = {"PYTHONPATH": str(REPO)}


class FakeProcess:
    """A rank whose exit code comes from a script: one poll() answer per call, the last one repeated."""

    instances: ClassVar[list[FakeProcess]] = []
    signals: ClassVar[list[tuple[int, int]]] = []
    scripts: ClassVar[dict[int, list[int | None]]] = {}
    joins = True
    """Whether each rank says it is ready (joined, target imported) as soon as it starts."""

    def __init__(self, argv, *, env, stdout, **kwargs):
        self.argv, self.env, self.kwargs = argv, env, kwargs
        self.pid = 4000 + len(FakeProcess.instances)
        self.rank = int(env["PADDLE_TRAINER_ID"])
        self.script = list(FakeProcess.scripts[self.rank])
        self.killed = False
        self.spec = json.loads(Path(argv[3]).read_text())
        self.wait_timeouts: list[float | None] = []
        stdout.write(f"log of rank {self.rank}\n".encode())
        if FakeProcess.joins:
            Path(argv[-1] + ".ready").touch()
        FakeProcess.instances.append(self)

    def poll(self):
        if self.killed:
            return -signal.SIGKILL
        code = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if code == 0:
            Path(self.argv[-1]).write_text(json.dumps({"rank": self.rank}))
        return code

    def wait(self, timeout=None):
        self.wait_timeouts.append(timeout)
        if not self.killed and self.script[-1] is None and timeout is not None:
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return 0

    def send_signal(self, sig):
        FakeProcess.signals.append((self.rank, sig))


@pytest.fixture
def fake_popen(monkeypatch):
    """Ranks are FakeProcesses; returns the (pid, signal) pairs sent to their sessions."""
    FakeProcess.instances = []
    FakeProcess.signals = []
    FakeProcess.scripts = {}
    FakeProcess.joins = True
    killpg_calls: list[tuple[int, int]] = []

    def killpg(pid, sig):
        killpg_calls.append((pid, sig))
        if sig == signal.SIGKILL:
            for process in FakeProcess.instances:
                if process.pid == pid:
                    process.killed = True

    monkeypatch.setattr(rank_processes.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(rank_processes.os, "killpg", killpg)
    with fake_sentinels(monkeypatch):
        yield killpg_calls


@contextlib.contextmanager
def fake_sentinels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake ranks get pidfds that never become readable (the read end of a pipe), and waiting for them is a
    ``time.sleep`` of the timeout, which tests can patch."""
    write_ends: list[int] = []

    def pidfd_open(pid: int) -> int:
        read_end, write_end = os.pipe()
        write_ends.append(write_end)
        return read_end

    monkeypatch.setattr(rank_processes.os, "pidfd_open", pidfd_open)
    monkeypatch.setattr(launcher, "wait_any", lambda ranks, others=(), timeout=None: launcher.time.sleep(timeout))
    try:
        yield
    finally:
        for fd in write_ends:
            os.close(fd)


@pytest.fixture
def fake_ranks(fake_popen, monkeypatch):
    """FakeProcess ranks, and no real waiting for their stacks or their exit."""
    monkeypatch.setattr(rank_processes, "STACK_WAIT_S", 0.0)
    monkeypatch.setattr(rank_processes, "KILL_GRACE_S", 0.01)
    return fake_popen


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "no_colon", "nranks": 2}, "target must look like 'package.module:function', got 'no_colon'"),
        ({"target": "m:f", "nranks": 0}, "nranks must be a positive integer, got 0"),
        ({"target": "m:f", "nranks": True}, "nranks must be a positive integer, got True"),
        ({"target": "m:f", "nranks": 2, "timeout": 0}, "timeout must be > 0 seconds, got 0"),
        ({"target": "m:f", "nranks": 2, "backend": "mpi"}, "backend must be 'gloo' or 'nccl', got 'mpi'"),
    ],
)
def test_bad_arguments_raise_value_error_before_starting_anything(kwargs, message, fake_ranks):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        run_ranks(**kwargs)
    assert FakeProcess.instances == []


def test_free_ports_are_distinct_and_bindable():
    with contextlib.ExitStack() as claims:
        ports = free_ports(5, claims)
    assert len(set(ports)) == 5
    assert all(1024 <= port < 65536 for port in ports)


def test_a_port_another_test_process_claimed_is_never_handed_out_until_its_claim_ends(monkeypatch):
    real_socket = socket.socket
    handed: list[int] = []

    class Probe:
        """A TCP socket bound to port 0 that the kernel gives the ports of ``offers`` in turn."""

        offers: ClassVar[list[int]] = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def bind(self, address):
            handed.append(Probe.offers.pop(0))

        def getsockname(self):
            return ("127.0.0.1", handed[-1])

    def sockets(family, kind):
        return real_socket(family, kind) if family == socket.AF_UNIX else Probe()

    with contextlib.ExitStack() as theirs:
        (taken,) = free_ports(1, theirs)
        monkeypatch.setattr(rank_world.socket, "socket", sockets)
        Probe.offers = [taken, taken + 1]
        with contextlib.ExitStack() as ours:
            assert free_ports(1, ours) == [taken + 1]
    # Their process closed its claims (or died): the port can be handed out again.
    Probe.offers = [taken]
    with contextlib.ExitStack() as ours:
        assert free_ports(1, ours) == [taken]


def test_rank_env_for_gloo_hides_gpus_and_names_every_endpoint():
    env = rank_env(1, 2, [7001, 7002, 7003])
    assert env == {
        "PADDLE_TRAINER_ID": "1",
        "PADDLE_TRAINERS_NUM": "2",
        "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:7001,127.0.0.1:7002",
        "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:7002",
        "PADDLE_MASTER": "127.0.0.1:7003",
        "PADDLE_DISTRI_BACKEND": "gloo",
        "PADDLE_RANK_IN_NODE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def test_rank_env_for_nccl_selects_the_rank_gpu():
    env = rank_env(0, 2, [7001, 7002, 7003], backend="nccl")
    assert env["PADDLE_DISTRI_BACKEND"] == "nccl"
    assert env["FLAGS_selected_gpus"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_success_returns_results_in_rank_order_and_reaps_every_rank(fake_ranks):
    FakeProcess.scripts = {0: [None, 0], 1: [None, None, 0], 2: [0]}
    results = run_ranks("pkg.mod:fn", 3, kwargs={"x": 1}, env={"EXTRA": "yes"}, poll_interval=0)
    assert results == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    first = FakeProcess.instances[0]
    assert first.argv[:3] == [sys.executable, "-c", launcher.RANK_BOOTSTRAP]
    assert first.spec == {"target": "pkg.mod:fn", "kwargs": {"x": 1}}
    assert first.env["EXTRA"] == "yes"
    assert first.env["PYTHONUNBUFFERED"] == "1"
    assert first.env[launcher.PARENT_VAR] == str(os.getpid())
    assert first.kwargs["start_new_session"] is True
    assert first.kwargs["stdin"] is subprocess.DEVNULL
    # Every rank's session is signalled, even after a clean exit, so no grandchild survives.
    pids = [process.pid for process in FakeProcess.instances]
    assert sorted(fake_ranks) == sorted((pid, sig) for pid in pids for sig in (signal.SIGTERM, signal.SIGKILL))


def test_one_failing_rank_kills_all_and_names_that_rank(fake_ranks):
    FakeProcess.scripts = {0: [None], 1: [None, 3], 2: [None]}
    with pytest.raises(RankFailed) as caught:
        run_ranks("pkg.mod:fn", 3, poll_interval=0)
    error = caught.value
    assert error.rank == 1
    assert error.returncode == 3
    assert str(error) == (
        "rank 1 of 3 failed in pkg.mod:fn: it exited before replying, exit code 3\n"
        "----- rank 1 -----\nlog of rank 1\n\n"
        "----- rank 0 (log tail) -----\nlog of rank 0\n\n"
        "----- rank 2 (log tail) -----\nlog of rank 2\n"
    )
    assert set(error.reports) == {0, 1, 2}
    assert all(process.killed for process in FakeProcess.instances)


def test_timeout_asks_each_live_rank_for_its_stack_then_kills_all(fake_ranks):
    FakeProcess.scripts = {0: [None], 1: [0]}
    with pytest.raises(RankTimeout) as caught:
        run_ranks("pkg.mod:fn", 2, timeout=0.05, poll_interval=0.01)
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert error.timeout == 0.05
    assert FakeProcess.signals == [(0, signal.SIGUSR1)]
    assert error.reports == {0: "log of rank 0\n"}
    assert (
        str(error)
        == "ranks [0] of 2 hung in pkg.mod:fn for 0.05 s; their stacks:\n----- rank 0 -----\nlog of rank 0\n"
    )
    assert all(process.killed for process in FakeProcess.instances)


def test_the_timeout_counts_from_the_moment_every_rank_is_ready_with_a_start_bound_before(fake_ranks):
    FakeProcess.scripts = {0: [None], 1: [None]}
    FakeProcess.joins = False
    with pytest.raises(RankTimeout) as caught:
        run_ranks("pkg.mod:fn", 2, timeout=30, start_timeout=0.05, poll_interval=0.01)
    assert (caught.value.timeout, caught.value.during) == (0.05, " while the ranks started")
    assert str(caught.value).startswith(
        "ranks [0, 1] of 2 hung in pkg.mod:fn while the ranks started for 0.05 s; their"
    )
    # Ready: a rank that finished counts as ready too; only then does the call's timeout start.
    FakeProcess.instances = []
    FakeProcess.scripts = {0: [None], 1: [0]}
    ready = []

    def join_late(seconds: float) -> None:
        ready.append(launcher.time.monotonic())
        if len(ready) == 3:
            Path(FakeProcess.instances[0].argv[-1] + ".ready").touch()

    with mock.patch.object(launcher.time, "sleep", join_late), pytest.raises(RankTimeout) as caught:
        run_ranks("pkg.mod:fn", 2, timeout=0.2, start_timeout=30, poll_interval=0.01)
    assert (caught.value.timeout, caught.value.during) == (0.2, "")
    assert caught.value.reports == {0: "log of rank 0\n"}


def test_a_rank_ignoring_sigterm_is_sigkilled_after_the_grace(fake_ranks):
    FakeProcess.scripts = {0: [None, 0]}
    FakeProcess.scripts[0][-1] = None  # never exits by itself
    with pytest.raises(RankTimeout):
        run_ranks("pkg.mod:fn", 1, timeout=0.01, poll_interval=0.01)
    (process,) = FakeProcess.instances
    assert process.killed
    assert process.wait_timeouts[0] == pytest.approx(0.01, abs=0.01)
    assert (process.pid, signal.SIGKILL) in fake_ranks


def test_the_documented_waits_are_120_s_for_the_ranks_1_s_for_their_stacks_and_3_s_before_sigkill(
    fake_popen, monkeypatch
):
    # Literals on purpose: changing how long a user waits is a decision, so it must show up in this test.
    FakeProcess.scripts = {0: [None]}
    clock = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(launcher.time, "sleep", sleep)
    with pytest.raises(RankTimeout) as caught:
        run_ranks("pkg.mod:fn", 1, poll_interval=10.0)
    assert caught.value.timeout == 120.0
    assert launcher.START_TIMEOUT_S == 180.0
    assert sleeps == [10.0] * 12 + [1.0]
    (process,) = FakeProcess.instances
    assert process.wait_timeouts[0] == 3.0
    assert (process.pid, signal.SIGKILL) in fake_popen


def test_keyboard_interrupt_kills_every_rank(fake_ranks, monkeypatch):
    FakeProcess.scripts = {0: [None], 1: [None]}

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_ranks("pkg.mod:fn", 2)
    assert [process.killed for process in FakeProcess.instances] == [True, True]


def test_signals_to_a_vanished_session_are_ignored():
    process = mock.Mock(pid=1)
    with mock.patch.object(rank_processes.os, "killpg", side_effect=ProcessLookupError):
        rank_processes._signal_session(process, signal.SIGTERM)


def test_log_tail_is_empty_before_the_log_exists_and_capped_after(tmp_path):
    rank = rank_processes.RankProcess(0, mock.Mock(), tmp_path / "rank0.log")
    assert rank.log_tail() == ""
    rank.log_path.write_text("x" * 4010 + "END")
    assert rank.log_tail() == "x" * 3997 + "END"


@pytest.mark.timeout(60)
def test_a_rank_whose_parent_is_already_gone_leaves_at_once():
    # The pid named is not this process's (the rank's parent): as if the parent had died before the prelude ran.
    done = subprocess.run(
        [sys.executable, "-c", launcher.RANK_PRELUDE + "print('still here')"],
        capture_output=True,
        text=True,
        env={**os.environ, launcher.PARENT_VAR: str(os.getpid() + 1)},
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (1, "")


@pytest.mark.timeout(60)
def test_real_child_returns_its_result():
    assert run_ranks("tests.unit.rank_targets:echo", 1, kwargs={"value": 41}, env=CHILD_ENV, timeout=30) == [
        {"value": 41, "rank": 0}
    ]


@pytest.mark.timeout(60)
def test_real_child_failure_shows_its_traceback():
    with pytest.raises(RankFailed) as caught:
        run_ranks("tests.unit.rank_targets:fail", 1, kwargs={"message": "boom"}, env=CHILD_ENV, timeout=30)
    assert caught.value.rank == 0
    assert caught.value.returncode == 1
    assert "ValueError: boom" in str(caught.value)
    assert "rank_targets.py" in str(caught.value)


@pytest.mark.parametrize(
    ("returncode", "expected"),
    [
        (0, "exit code 0"),
        (1, "exit code 1"),
        (-11, "exit code -11 (SIGSEGV)"),
        (-9, "exit code -9 (SIGKILL)"),
        (-6, "exit code -6 (SIGABRT)"),
        (-200, "exit code -200 (signal 200)"),
    ],
)
def test_exit_description_names_the_signal_that_killed_a_process(returncode, expected):
    assert launcher.exit_description(returncode) == expected


def test_the_bootstrap_starts_with_the_prelude_that_ties_the_rank_to_its_parent_and_arms_faulthandler():
    assert launcher.RANK_BOOTSTRAP.startswith(launcher.RANK_PRELUDE)
    statements = [part.strip() for part in launcher.RANK_PRELUDE.split(";") if part.strip()]
    assert statements == [
        "import ctypes, faulthandler, os, signal, sys",
        "ctypes.CDLL(None).prctl(1, signal.SIGKILL)",
        "os.getppid() == int(os.environ.get('FDP_RANK_PARENT', os.getppid())) or os._exit(1)",
        "faulthandler.enable(all_threads=True)",
        "faulthandler.register(signal.SIGUSR1, all_threads=True)",
    ]


@pytest.mark.timeout(60)
def test_real_child_that_crashes_names_the_rank_the_signal_and_every_threads_stack():
    with pytest.raises(RankFailed) as caught:
        run_ranks("tests.unit.rank_targets:crash_on_purpose", 1, env=CHILD_ENV, timeout=30)
    report = str(caught.value)
    assert caught.value.rank == 0
    assert caught.value.returncode == -signal.SIGSEGV
    assert report.startswith(
        "rank 0 of 1 failed in tests.unit.rank_targets:crash_on_purpose: it exited before replying, exit code -11 "
        "(SIGSEGV)\n----- rank 0 -----\n"
    )
    assert "Fatal Python error: Segmentation fault" in report
    targets = REPO / "tests" / "unit" / "rank_targets.py"
    # The crashing thread names the function that crashed; the idle thread is shown too (all_threads).
    crashing = report.split("Current thread ", 1)[1]
    assert re.search(rf'File "{re.escape(str(targets))}", line \d+ in crash_on_purpose', crashing)
    idle = report.split("Current thread ", 1)[0]
    assert re.search(rf'File "{re.escape(str(targets))}", line \d+ in _idle', idle)


# Stands in for Paddle in the child: its import signals that the child is inside its imports, then never ends.
# The ready file appears by a rename, one system call with no Python frame of its own: from the moment it exists, the
# child's innermost Python frame is this module, at the rename's line or at the sleep's. (With `Path.touch()`, the
# file existed while `touch` still ran, and a stack taken then began in pathlib: 1 red CI run in 5.)
_STUCK_PADDLE = """\
import os, time
os.close(os.open(os.environ["FDP_TEST_IMPORT_READY"] + ".tmp", os.O_CREAT | os.O_WRONLY))
os.rename(os.environ["FDP_TEST_IMPORT_READY"] + ".tmp", os.environ["FDP_TEST_IMPORT_READY"])
time.sleep(600)
"""


@pytest.mark.timeout(90)
def test_real_child_stuck_in_its_imports_shows_its_stack_down_to_the_bootstrap(tmp_path, monkeypatch):
    # A `paddle` package that blocks on import, first on the child's path: the child is stuck in its imports at a
    # known, shallow depth. (A timeout during the real Paddle imports catches a stack that may be deeper than
    # faulthandler's 100 frames, which then ends in "..." instead of the bootstrap frame.)
    fake = tmp_path / "site" / "paddle"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(_STUCK_PADDLE)
    ready = tmp_path / "importing"
    _deadline_passes_once(ready, monkeypatch)
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}", "FDP_TEST_IMPORT_READY": str(ready)}
    with pytest.raises(RankTimeout) as caught:
        run_ranks("tests.unit.rank_targets:import_paddle", 1, env=env, timeout=60)
    stack = caught.value.reports[0]
    frames = [line.strip() for line in stack.splitlines() if line.lstrip().startswith("File ")]
    # Most recent call first: the blocked import, then the rank's import of Paddle (before the target's module) and
    # the rank entry calling it, and last the bootstrap's own frame, which shows faulthandler was registered before
    # anything was imported.
    assert frames[0] in (f'File "{fake / "__init__.py"}", line {line} in <module>' for line in (3, 4))
    testing = REPO / "fastdeploy_patch" / "testing"
    assert any(frame.startswith(f'File "{testing / "rank_imports.py"}"') for frame in frames)
    assert any(frame.startswith(f'File "{testing / "rank_entry.py"}"') for frame in frames)
    assert not any("rank_targets.py" in frame for frame in frames)
    assert frames[-1] == 'File "<string>", line 1 in <module>'
    assert "sleep_forever" not in stack
    assert _children_named("fastdeploy_patch.testing.rank_entry") == []


@pytest.mark.timeout(90)
def test_real_stuck_child_is_killed_and_its_stack_shown(tmp_path, monkeypatch):
    ready = tmp_path / "ready"
    _deadline_passes_once(ready, monkeypatch)
    with pytest.raises(RankTimeout) as caught:
        run_ranks("tests.unit.rank_targets:sleep_forever", 1, kwargs={"ready": str(ready)}, env=CHILD_ENV, timeout=60)
    stack = caught.value.reports[0]
    assert "sleep_forever" in stack
    assert "rank_targets.py" in stack
    assert _children_named("fastdeploy_patch.testing.rank_entry") == []


def _deadline_passes_once(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the launcher's deadline pass the moment the child creates ``ready``, however long it took to get there
    on a loaded machine."""
    real_clock = launcher.time.monotonic
    jumps = iter(range(1, 1 << 30))
    # Each look after that is an hour later than the last: a deadline set meanwhile passes at the next look too.
    monkeypatch.setattr(
        launcher.time, "monotonic", lambda: real_clock() + (3600 * next(jumps) if ready.exists() else 0)
    )


def _children_named(text: str) -> list[str]:
    """Command lines of this process's live children that contain ``text``."""
    lines = (" ".join(procfs.cmdline(pid) or []) for pid in procfs.children("self") or [])
    return [line for line in lines if text in line]
