"""The warm parent: when a world may be forked, and what a forked rank gets (exit code, death signal, session,
environment, descriptors, output, death with its parent), on a real parent that imports no Paddle."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import signal
import subprocess
import sys
import time

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import warm_parent
from fastdeploy_patch.testing.rank_processes import RANK_PRELUDE

ENTRY = "tests.unit.fork_entries"
BOOTSTRAP = RANK_PRELUDE + (
    "from fastdeploy_patch.testing.fork_server import serve; from tests.unit import fork_entries; "
    "sys.exit(serve(sys.argv[1:], entries=('tests.unit.fork_entries',), warm_up=fork_entries.{warm_up}))"
)


def _started_parent(tmp_path, warm_up: str):
    return warm_parent.WarmParent.start(
        tmp_path / "parent.log", dict(os.environ), bootstrap=BOOTSTRAP.format(warm_up=warm_up), entries=(ENTRY,)
    )


@pytest.fixture
def parent(tmp_path):
    started = _started_parent(tmp_path, "warm_up")
    yield started
    started.close()


@pytest.fixture
def threaded_parent(tmp_path):
    """A parent that holds a second thread when asked to fork."""
    started = _started_parent(tmp_path, "warm_up_with_a_thread")
    yield started
    started.close()


def _report(parent, tmp_path, **env) -> tuple[object, dict]:
    read, write = os.pipe()
    try:
        rank = parent.fork(
            ENTRY, ["report", str(write)], {**os.environ, **env}, tmp_path / "rank.log", pass_fds=[write]
        )
    finally:
        os.close(write)
    with os.fdopen(read) as out:
        seen = ast.literal_eval(out.read())
    return rank, seen


def test_a_forked_rank_runs_its_entry_in_a_session_of_its_own_with_the_worlds_environment(parent, tmp_path):
    rank, seen = _report(parent, tmp_path, FDP_TEST_VALUE="world")
    assert rank.wait(30) == 0
    assert seen["pid"] == rank.pid
    assert seen["sid"] == rank.pid  # killing its session reaches what it starts
    assert seen["ppid"] == parent.process.pid
    assert seen["env"] == "world"
    assert seen["cwd"] == os.getcwd()
    # The descriptor's number in the rank replaced the test process's number in its arguments.
    assert seen["argv"][0] == "report" and seen["argv"][1].isdigit()
    assert parent.threads_at_fork == [1]


def test_every_fork_happens_with_one_thread_in_the_parent(parent, tmp_path):
    ranks = [parent.fork(ENTRY, ["exit", "0"], dict(os.environ), tmp_path / f"r{i}.log") for i in range(3)]
    assert [rank.wait(30) for rank in ranks] == [0, 0, 0]
    assert parent.threads_at_fork == [1, 1, 1]


def test_a_parent_holding_a_second_thread_refuses_to_fork(threaded_parent, tmp_path):
    with pytest.raises(RuntimeError, match="the warm parent refused: the warm parent holds 2 threads"):
        threaded_parent.fork(ENTRY, ["exit", "0"], dict(os.environ), tmp_path / "r.log")
    assert threaded_parent.threads_at_fork == []


def test_exit_codes_and_death_signals_reach_the_test_process_as_popen_gives_them(parent, tmp_path):
    exits = parent.fork(ENTRY, ["exit", "3"], dict(os.environ), tmp_path / "a.log")
    killed = parent.fork(ENTRY, ["signal"], dict(os.environ), tmp_path / "b.log")
    assert exits.wait(30) == 3
    assert killed.wait(30) == -signal.SIGTERM
    assert exits.poll() == 3 and exits.returncode == 3


def test_a_rank_still_running_times_out_its_wait_and_can_be_killed(parent, tmp_path):
    rank = parent.fork(ENTRY, ["sleep"], dict(os.environ), tmp_path / "r.log")
    assert rank.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        rank.wait(0.2)
    rank.kill()
    assert rank.wait(30) == -signal.SIGKILL
    rank.send_signal(signal.SIGTERM)  # ended: nothing to signal, no error
    assert rank.returncode == -signal.SIGKILL


def test_a_ranks_output_goes_to_its_log(parent, tmp_path):
    rank = parent.fork(ENTRY, ["print", "hello from the rank"], dict(os.environ), tmp_path / "r.log")
    assert rank.wait(30) == 0
    assert (tmp_path / "r.log").read_text() == "hello from the rank\n"


def test_ranks_die_with_their_parent_and_count_as_killed(tmp_path):
    parent = _started_parent(tmp_path, "warm_up")
    rank = parent.fork(ENTRY, ["sleep"], dict(os.environ), tmp_path / "r.log")
    os.kill(parent.process.pid, signal.SIGKILL)
    parent.process.wait(30)
    assert rank.wait(30) == -signal.SIGKILL
    with pytest.raises(RuntimeError, match=f"the warm parent \\(pid {parent.process.pid}\\)"):
        parent.fork(ENTRY, ["exit", "0"], dict(os.environ), tmp_path / "r2.log")
    parent.close()


def test_closing_the_parent_ends_it_and_the_ranks_it_forked(tmp_path):
    parent = _started_parent(tmp_path, "warm_up")
    rank = parent.fork(ENTRY, ["sleep"], dict(os.environ), tmp_path / "r.log")
    parent.close()
    assert parent.process.returncode == 0  # it left on its own when hung up on
    assert rank.wait(30) == -signal.SIGKILL
    parent.close()  # idempotent


def test_only_the_parents_entries_can_be_forked(parent, tmp_path):
    with pytest.raises(ValueError, match=r"entry must be one of \('tests.unit.fork_entries',\), got 'os'"):
        parent.fork("os", [], dict(os.environ), tmp_path / "r.log")


def test_a_parent_that_exits_before_it_is_ready_is_reported_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"sent no 'ready' within 30 s or exited \(exit code 4\):\nbroken parent"):
        warm_parent.WarmParent.start(
            tmp_path / "parent.log",
            dict(os.environ),
            bootstrap="import sys; print('broken parent', flush=True); sys.exit(4)",
            timeout=30,
        )


def test_a_parent_not_ready_in_time_is_killed(tmp_path):
    with pytest.raises(RuntimeError, match=r"sent no 'ready' within 0.5 s or exited \(exit code -9\)"):
        warm_parent.WarmParent.start(
            tmp_path / "parent.log", dict(os.environ), bootstrap="import time; time.sleep(60)", timeout=0.5
        )


def test_the_parent_starts_with_blas_on_one_thread_and_no_gpu():
    env = warm_parent.parent_environment({"HOME": "/root", "OPENBLAS_NUM_THREADS": "8"})
    assert env == {
        "HOME": "/root",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({}, None),
        ({"FDP_ANYTHING": "1", "PADDLE_TRAINER_ID": "1"}, None),
        ({"OMP_NUM_THREADS": "1"}, None),  # the parent's own value
        ({"FLAGS_use_mkldnn": "0", "OMP_NUM_THREADS": "4"}, "the environment sets FLAGS_use_mkldnn, OMP_NUM_THREADS"),
        ({"PYTHONHASHSEED": "0"}, "the environment sets PYTHONHASHSEED otherwise than the warm parent, which read"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "the environment sets CUDA_VISIBLE_DEVICES"),
        ({"OPENBLAS_NUM_THREADS": None}, "the environment sets OPENBLAS_NUM_THREADS"),  # unset where the parent set it
    ],
)
def test_a_rank_is_forked_unless_its_environment_differs_in_what_is_read_at_start(changes, refusal, monkeypatch):
    monkeypatch.setattr(warm_parent, "gpu_build", lambda: False)
    parent_env = warm_parent.parent_environment({"HOME": "/root"})
    env = {**parent_env, **changes}
    env = {name: value for name, value in env.items() if value is not None}
    found = warm_parent.fork_refusal(env, parent_env)
    assert found is None if refusal is None else found.startswith(refusal)


def test_the_parent_leaves_out_the_variables_that_name_one_rank():
    rank = {"HOME": "/root", "PADDLE_TRAINER_ID": "1", "PADDLE_MASTER": "127.0.0.1:1", "PADDLE_RANKS_RUN": "tag"}
    assert warm_parent.parent_environment(rank) == {
        "HOME": "/root",
        "PADDLE_RANKS_RUN": "tag",
        **warm_parent.PARENT_ENV,
    }


def test_a_command_prefix_gpu_devices_a_gpu_build_or_no_fork_means_spawning(monkeypatch):
    monkeypatch.setattr(warm_parent, "gpu_build", lambda: False)
    assert warm_parent.fork_refusal({}, {}, command_prefix=("nsenter", "-n")) == (
        "the rank's interpreter starts through 'nsenter -n'"
    )
    assert warm_parent.fork_refusal({}, {}, devices="gpu") == (
        "devices='gpu': CUDA must not be initialised in a process that forks"
    )
    monkeypatch.setattr(warm_parent, "gpu_build", lambda: True)
    assert warm_parent.fork_refusal({}, {}) == (
        "Paddle is a GPU build: CUDA must not be initialised in a process that forks"
    )
    monkeypatch.setattr(sys, "platform", "darwin")
    assert warm_parent.fork_refusal({}, {}) == "this platform (darwin) cannot fork a warm parent"


def test_a_gpu_build_is_told_by_its_distribution(monkeypatch):
    seen = []

    def distribution(name):
        seen.append(name)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert warm_parent.gpu_build() is False
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: seen.append(name))
    assert warm_parent.gpu_build() is True
    assert seen == ["paddlepaddle-gpu", "paddlepaddle-gpu"]


def test_a_refused_fork_closes_the_descriptors_it_was_given(threaded_parent, tmp_path):
    read, write = os.pipe()
    try:
        with pytest.raises(RuntimeError, match="holds 2 threads"):
            threaded_parent.fork(ENTRY, ["exit", "0"], dict(os.environ), tmp_path / "r.log", pass_fds=[write])
        os.close(write)
        # No copy of the write end is left open in the parent: the reader sees the end of the pipe.
        assert os.read(read, 1) == b""
    finally:
        os.close(read)


def test_a_parent_that_does_not_leave_when_hung_up_on_is_killed(monkeypatch):
    import socket

    monkeypatch.setattr(warm_parent, "CLOSE_GRACE_S", 0.1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    stubborn = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    parent = warm_parent.WarmParent(stubborn, ours, {})
    started = time.monotonic()
    parent.close()
    assert stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 30


def test_a_rank_whose_parent_died_before_it_asked_to_die_with_it_leaves():
    # pid 1 is nobody's parent here: the process must leave with exit code 1 instead of running on unwatched.
    code = subprocess.run(
        [sys.executable, "-c", "from fastdeploy_patch.testing import fork_server; fork_server.die_with(1); print(9)"],
        capture_output=True,
        timeout=60,
    )
    assert (code.returncode, code.stdout) == (1, b"")
    watched = "import os; from fastdeploy_patch.testing import fork_server; fork_server.die_with(os.getppid())"
    alive = subprocess.run(
        [sys.executable, "-c", watched + "; print(9)"],
        capture_output=True,
        timeout=60,
    )
    assert (alive.returncode, alive.stdout) == (0, b"9\n")


@pytest.fixture
def fake_shared(monkeypatch):
    """``shared`` starts its parent with the tests' entries and no Paddle; whatever it started is closed after."""
    monkeypatch.setattr(warm_parent, "BOOTSTRAP", BOOTSTRAP.format(warm_up="warm_up"))
    monkeypatch.setattr(warm_parent, "ENTRIES", (ENTRY,))
    yield
    warm_parent.close_shared()


def test_this_process_keeps_one_warm_parent_until_it_is_gone_or_closed(fake_shared, tmp_path):
    assert warm_parent.shared_env() is None and warm_parent.shared_pid() is None
    first = warm_parent.shared({**os.environ, "PADDLE_TRAINER_ID": "3"})
    assert warm_parent.shared({}) is first
    assert warm_parent.shared_pid() == first.process.pid
    assert warm_parent.shared_env() == warm_parent.parent_environment(os.environ)
    log_dir = warm_parent._SHARED[0][1]
    assert os.path.isfile(os.path.join(log_dir, "parent.log"))
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(30)
    assert warm_parent.shared_env() is None
    second = warm_parent.shared(dict(os.environ))
    assert second is not first and not os.path.exists(log_dir)  # the dead one's log went with it
    second_dir = warm_parent._SHARED[0][1]
    warm_parent.close_shared()
    assert second.gone() and not os.path.exists(second_dir) and warm_parent.shared_pid() is None


def test_a_parent_whose_process_cannot_start_leaves_no_socket_open(monkeypatch, tmp_path):
    def refuse(spec):
        raise OSError("no such interpreter")

    before = procfs.fds("self")
    monkeypatch.setattr(warm_parent, "start_rank", refuse)
    with pytest.raises(OSError, match="no such interpreter"):
        warm_parent.WarmParent.start(tmp_path / "parent.log", dict(os.environ))
    assert procfs.fds("self") == before


def test_a_parent_that_cannot_start_leaves_no_log_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(warm_parent, "BOOTSTRAP", "import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"exit code 3"):
        warm_parent.shared(dict(os.environ), log_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == [] and warm_parent.shared_pid() is None


def test_the_fork_start_method_runs_the_specs_entry_in_the_shared_parent(fake_shared, tmp_path):
    from fastdeploy_patch.testing import rank_processes

    argv = (sys.executable, "-c", "unused: a forked rank runs its entry", "print", "forked")
    spec = rank_processes.RankSpec(0, argv, dict(os.environ), tmp_path / "r.log", start_method="fork", entry=ENTRY)
    started = rank_processes.start_rank(spec)
    assert started.process.wait(30) == 0 and started.process.pid != warm_parent.shared_pid()
    rank_processes.kill_ranks([started], 0)
    assert (tmp_path / "r.log").read_text() == "forked\n"
    assert warm_parent.shared({}).threads_at_fork == [1]
    with pytest.raises(ValueError, match=r"^rank 0 names no entry module, which a forked rank runs instead of its"):
        rank_processes.start_rank(rank_processes.RankSpec(0, argv, {}, tmp_path / "s.log", start_method="fork"))


def test_a_parent_whose_answer_comes_from_another_process_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(warm_parent, "CLOSE_GRACE_S", 0.1)
    impostor = (
        "import pickle, socket, sys, time; sock = socket.socket(fileno=int(sys.argv[1])); "
        "sock.send(pickle.dumps({'kind': 'ready', 'pid': 1})); time.sleep(60)"
    )
    with pytest.raises(RuntimeError, match=r"^process 1 answered the warm parent \d+ was to be$"):
        warm_parent.WarmParent.start(tmp_path / "parent.log", dict(os.environ), bootstrap=impostor)
