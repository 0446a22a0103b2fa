"""fastdeploy_patch.testing.rank_processes on real children: the one start (spec in, session leader with a log and a
pidfd out), the wait that wakes on an exit, the stacks, the kill, and logs read from an offset."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.signal_group import shm_segment
from fastdeploy_patch.testing import rank_processes
from fastdeploy_patch.testing.rank_processes import RankSpec, kill_ranks, stacks, start_rank, wait_any


def spec(tmp_path: Path, rank: int, code: str, **extra: object) -> RankSpec:
    argv = (sys.executable, "-c", rank_processes.RANK_PRELUDE + code)
    return RankSpec(rank, argv, {**os.environ, "WHO": f"rank{rank}"}, tmp_path / f"rank{rank}.log", **extra)


@pytest.mark.timeout(60)
def test_a_started_rank_runs_its_spec_in_a_session_of_its_own_and_its_exit_wakes_the_wait(tmp_path: Path) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    read_end, write_end = os.pipe()
    code = (
        "import os; print(os.environ['WHO'], os.getcwd(), os.environ['PYTHONUNBUFFERED'], "
        f"os.environ['{rank_processes.PARENT_VAR}'], os.getsid(0) == os.getpid()); "
        f"os.write({write_end}, b'x')"
    )
    started = start_rank(spec(tmp_path, 3, code, cwd=str(workdir), pass_fds=(write_end,)))
    os.close(write_end)
    try:
        assert wait_any([started], timeout=30) == [started.sentinel]
        assert started.process.wait(5) == 0 and os.read(read_end, 1) == b"x"
        assert started.log_text() == f"rank3 {workdir} 1 {os.getpid()} True\n"
        assert started.log_text(len("rank3 ")) == f"{workdir} 1 {os.getpid()} True\n"
        assert started.log_size() == len(started.log_text())
    finally:
        os.close(read_end)
        kill_ranks([started], 0)
    assert started.sentinel == -1
    started.close()


@pytest.mark.timeout(60)
def test_the_wait_returns_what_is_ready_or_nothing_at_its_timeout(tmp_path: Path) -> None:
    sleeper = start_rank(spec(tmp_path, 0, "import time; time.sleep(60)"))
    read_end, write_end = os.pipe()
    try:
        assert wait_any([sleeper], [read_end], timeout=0.05) == []
        os.write(write_end, b"x")
        assert wait_any([sleeper], [read_end], timeout=5) == [read_end]
    finally:
        os.close(read_end)
        os.close(write_end)
        kill_ranks([sleeper], 0)
    # A killed rank is reaped and its pidfd closed: waiting for it returns at once with nothing.
    assert sleeper.process.returncode in (-signal.SIGTERM, -signal.SIGKILL) and wait_any([sleeper], timeout=0) == []


@pytest.mark.timeout(60)
def test_stacks_come_from_live_ranks_only(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    live = start_rank(spec(tmp_path, 0, code))
    gone = start_rank(spec(tmp_path, 1, "pass"))
    try:
        gone.process.wait(30)
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        taken = stacks([live, gone])
        assert list(taken) == [0] and "thread 0x" in taken[0] and "line 1 in <module>" in taken[0]
    finally:
        kill_ranks([live, gone], 0)
    assert stacks([live, gone]) == {}


def test_a_missing_log_reads_as_empty(tmp_path: Path) -> None:
    rank = rank_processes.RankProcess(0, None, tmp_path / "none.log")
    assert (rank.log_text(), rank.log_tail(), rank.log_size()) == ("", "", 0)


def test_a_failed_pidfd_open_kills_the_rank_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def refuse(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(rank_processes.subprocess, "Popen", popen)
    monkeypatch.setattr(rank_processes.os, "pidfd_open", refuse)
    with pytest.raises(OSError, match="Function not implemented"):
        start_rank(spec(tmp_path, 0, "import time; time.sleep(60)"))
    (process,) = started
    assert process.returncode in (-signal.SIGTERM, -signal.SIGKILL)


def test_a_start_method_is_looked_up_by_name_and_gets_the_ranks_whole_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[RankSpec, dict]] = []

    def recording(spec: RankSpec, env: dict) -> subprocess.Popen:
        calls.append((spec, env))
        return rank_processes.spawn(spec, env)

    monkeypatch.setitem(rank_processes.START_METHODS, "recording", recording)
    wanted = spec(tmp_path, 0, "pass", start_method="recording")
    started = start_rank(wanted)
    kill_ranks([started], 0)
    ((seen, env),) = calls
    assert seen is wanted
    assert env == {**wanted.env, "PYTHONUNBUFFERED": "1", rank_processes.PARENT_VAR: str(os.getpid())}
    with pytest.raises(ValueError, match=r"^start_method must be one of \['fork', 'recording', 'spawn'\], got 'f'$"):
        start_rank(spec(tmp_path, 0, "pass", start_method="f"))


@pytest.mark.timeout(60)
def test_killing_ranks_with_nothing_left_to_save_sends_no_sigterm(tmp_path: Path) -> None:
    code = (
        "import pathlib, signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).touch(), sys.exit(0))); "
        "print('ready', flush=True); time.sleep(60)"
    )
    ranks = []
    for rank, term in enumerate((False, True)):
        marker = tmp_path / f"termed{rank}"
        wanted = spec(tmp_path, rank, code)
        started = start_rank(replace(wanted, argv=(*wanted.argv, str(marker))))
        while "ready" not in started.log_text():
            time.sleep(0.01)
        kill_ranks([started], 10, term=term)
        ranks.append((started.process.returncode, marker.exists()))
    assert ranks == [(-signal.SIGKILL, False), (0, True)]


@pytest.mark.timeout(60)
def test_a_rank_that_ended_before_it_could_be_watched_is_seen_as_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(pid: int) -> int:
        raise ProcessLookupError(3, "No such process")

    def finished(spec: RankSpec, env: dict) -> subprocess.Popen:
        process = rank_processes.spawn(spec, env)
        process.wait()
        return process

    monkeypatch.setitem(rank_processes.START_METHODS, "finished", finished)
    monkeypatch.setattr(rank_processes.os, "pidfd_open", gone)
    started = start_rank(spec(tmp_path, 0, "import sys; sys.exit(4)", start_method="finished"))
    assert wait_any([started], timeout=0) == [started.sentinel]
    assert started.process.returncode == 4
    started.close()
    # A rank still running whose pidfd cannot be had is killed, and the error goes on.
    with pytest.raises(ProcessLookupError):
        start_rank(spec(tmp_path, 1, "import time; time.sleep(60)"))


# A helper that a rank starts in its session and that, like multiprocessing's resource tracker, ignores SIGTERM and
# leaves on its own once the rank is gone (its pipe from the rank reads EOF), after doing its last job.
HELPER = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); "
    "os.read(int(sys.argv[1]), 1); time.sleep(float(sys.argv[3])); open(sys.argv[2], 'w').close()"
)
STARTS_HELPER = (
    "import os, subprocess, sys, time; r, w = os.pipe(); "
    "helper = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(r), *sys.argv[2:]], pass_fds=(r,)); "
    "os.close(r); print('helper', helper.pid, flush=True); time.sleep(60)"
)


@pytest.mark.timeout(60)
# A grace longer than the test's timeout: the kill must end as soon as nothing is left in the session, not sit it out.
@pytest.mark.parametrize(("helper_takes", "grace", "job_done"), [(0.3, 120.0, True), (30.0, 0.5, False)])
def test_a_kill_gives_what_a_rank_started_the_rest_of_the_grace_to_leave_then_kills_it(
    tmp_path: Path, helper_takes: float, grace: float, job_done: bool
) -> None:
    marker = tmp_path / "job"
    wanted = spec(tmp_path, 0, STARTS_HELPER)
    started = start_rank(replace(wanted, argv=(*wanted.argv, HELPER, str(marker), str(helper_takes))))
    while "armed" not in started.log_text():
        time.sleep(0.01)
    helper = int(started.log_text().split("helper ")[1].split()[0])
    kill_ranks([started], grace)
    job = marker.exists()
    # The session's SIGKILL is sent when kill_ranks returns; the orphaned helper dies a moment later.
    deadline = time.monotonic() + 10
    while (left := procfs.stat(helper)) is not None and left.state != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (job, left is None or left.state == "Z") == (job_done, True)
    assert started.process.returncode == -signal.SIGTERM


@pytest.mark.timeout(60)
def test_a_creator_killed_inside_its_handshake_leaves_no_segment_its_tracker_removes_it(tmp_path: Path) -> None:
    # The creator registered the segment's name with multiprocessing's resource tracker, a process in its session
    # that ignores SIGTERM: the kill must let it remove the name once the creator is gone.
    tag = f"kill{os.getpid()}"
    code = (
        "import time; from fastdeploy_patch.signal_group.shm_segment import ShmRing; "
        "print('created', ShmRing.create([0, 1]).path, flush=True); time.sleep(60)"
    )
    wanted = spec(tmp_path, 0, code)
    started = start_rank(replace(wanted, env={**wanted.env, shm_segment.SEGMENT_TAG_ENV: tag}))
    deadline = time.monotonic() + 30
    while "created" not in started.log_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    path = started.log_text().split("created ")[1].split()[0]
    try:
        assert os.path.exists(path) and tag in path
        kill_ranks([started], 120)
        assert not os.path.exists(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@pytest.mark.timeout(60)
def test_a_zombie_left_in_a_ranks_session_holds_nothing_and_the_kill_does_not_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An orphan that exited but that init has not reaped yet is still listed in the session; it can hold nothing.
    started = start_rank(spec(tmp_path, 0, "print('ready', flush=True); import time; time.sleep(60)"))
    while "ready" not in started.log_text():
        time.sleep(0.01)
    zombie = 1 << 22
    real_pids, real_stat = procfs.pids, procfs.stat
    monkeypatch.setattr(procfs, "pids", lambda: [*real_pids(), zombie])
    monkeypatch.setattr(
        procfs,
        "stat",
        lambda pid: procfs.Stat("orphan", "Z", 1, started.process.pid, 0) if pid == zombie else real_stat(pid),
    )
    # A grace longer than the test's timeout: waiting for the zombie would fail the test.
    kill_ranks([started], 120)
    assert started.process.returncode == -signal.SIGTERM
