"""The paddle_ranks leak guard: this run's processes found by their tag and killed, kept ranks left alone, and new
segments with this process's prefixes reported only when they stay."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.signal_group import SEGMENT_PREFIX, SEGMENT_TAG_ENV
from fastdeploy_patch.testing import leak_guard

from .zombies import wait_until_a_zombie


def tagged_child(*, tagged: bool = True) -> subprocess.Popen:
    """A child that sleeps with this run's tag (or another run's), returned once the kernel shows its environment:
    Popen may return while the child is still inside execve, with no environment to read yet."""
    env = {**os.environ, leak_guard.RUN_TAG_VAR: leak_guard.RUN_TAG if tagged else "another run"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while leak_guard.RUN_TAG_VAR not in (procfs.environ(child.pid) or {}):
        assert time.monotonic() < deadline, f"child {child.pid} showed no environment within 30 s"
        time.sleep(0.01)
    return child


@pytest.mark.timeout(60)
def test_a_tagged_process_is_found_and_killed_unless_its_session_is_kept() -> None:
    ours, theirs = tagged_child(), tagged_child(tagged=False)
    try:
        found = leak_guard.tagged_processes()
        assert ours.pid in found and "time.sleep(60)" in found[ours.pid] and theirs.pid not in found
        assert ours.pid not in leak_guard.tagged_processes(kept=[ours.pid])
        assert leak_guard.stray_processes(lambda: [ours.pid], grace=0) == {}
        strays = leak_guard.stray_processes(grace=0.2)
        assert list(strays) == [ours.pid]
        assert ours.wait(10) == -9
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()


@pytest.mark.timeout(60)
def test_a_zombie_is_no_leftover() -> None:
    child = tagged_child()
    try:
        child.kill()
        wait_until_a_zombie(child.pid)
        assert child.pid not in leak_guard.tagged_processes()
    finally:
        child.wait()


@pytest.mark.timeout(60)
def test_a_process_that_ends_or_cannot_be_read_during_the_scan_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pids 1-3 are listed, then 1 is gone before its stat is read, 2 before its environment is, and 3's environment
    is another user's: only the tagged child is found, and the scan goes on past each."""
    real_stat, real_environ = procfs.stat, procfs.environ
    stats = {1: None, 2: real_stat("self"), 3: real_stat("self")}

    def environ(pid: int) -> dict[str, str] | None:
        if pid == 3:
            raise PermissionError(13, "Permission denied", f"/proc/{pid}/environ")
        return None if pid == 2 else real_environ(pid)

    ours = tagged_child()
    try:
        monkeypatch.setattr(procfs, "pids", lambda: [1, 2, 3, ours.pid])
        monkeypatch.setattr(procfs, "stat", lambda pid: stats[pid] if pid in stats else real_stat(pid))
        monkeypatch.setattr(procfs, "environ", environ)
        assert list(leak_guard.tagged_processes()) == [ours.pid]
    finally:
        ours.kill()
        ours.wait()


def test_tagging_keeps_a_tag_set_already(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set first, so that monkeypatch puts back whatever was there, absence included, after the guard's own change.
    monkeypatch.setenv(SEGMENT_TAG_ENV, "before")
    monkeypatch.delenv(SEGMENT_TAG_ENV)
    leak_guard.tag_this_process()
    assert os.environ[SEGMENT_TAG_ENV] == leak_guard.SEGMENT_TAG == f"{leak_guard.RUN_TAG[:8]}p{os.getpid()}"
    monkeypatch.setenv(SEGMENT_TAG_ENV, "mine")
    leak_guard.tag_this_process()
    assert os.environ[SEGMENT_TAG_ENV] == "mine"


def test_segments_are_ours_by_tag_or_prefix_and_leak_only_when_they_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leak_guard, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(leak_guard, "SEGMENT_GRACE_S", 0.0)
    monkeypatch.setenv(SEGMENT_TAG_ENV, "t1")
    for name in (f"{SEGMENT_PREFIX}t1_a", f"{SEGMENT_PREFIX}t2_b", "status_c", "other"):
        (tmp_path / name).touch()
    assert leak_guard.our_segments() == {f"{SEGMENT_PREFIX}t1_a"}
    assert leak_guard.our_segments(["status_"]) == {f"{SEGMENT_PREFIX}t1_a", "status_c"}
    before = leak_guard.our_segments(["status_"])
    (tmp_path / f"{SEGMENT_PREFIX}t1_new").touch()
    assert leak_guard.leaked_segments(before, ["status_"]) == {f"{SEGMENT_PREFIX}t1_new"}
    monkeypatch.delenv(SEGMENT_TAG_ENV)
    assert leak_guard.our_segments() == set()
    monkeypatch.setattr(leak_guard, "SHM_DIR", str(tmp_path / "missing"))
    assert leak_guard.our_segments(["status_"]) == set()


def test_a_segment_gone_within_the_grace_is_no_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leak_guard, "SHM_DIR", str(tmp_path))
    brief = tmp_path / "status_brief"
    brief.touch()
    monkeypatch.setattr(leak_guard.time, "sleep", lambda seconds: brief.unlink())
    assert leak_guard.leaked_segments(set(), ["status_"]) == set()


@pytest.mark.timeout(60)
def test_leaks_names_the_processes_and_segments_a_test_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leak_guard, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(leak_guard, "SEGMENT_GRACE_S", 0.0)
    monkeypatch.setattr(leak_guard, "LEFTOVER_GRACE_S", 0.2)
    assert leak_guard.leaks(set(), ["status_"], None) == []
    (tmp_path / "status_left").touch()
    child = tagged_child()

    class Pools:
        def live_pids(self) -> list[int]:
            return []

    try:
        problems = leak_guard.leaks(set(), ["status_"], Pools())
    finally:
        child.kill()
        child.wait()
    assert len(problems) == 2 and problems[1] == "shared-memory segments leaked: ['status_left']"
    assert problems[0].startswith(f"rank processes outlived the test: {{{child.pid}: ")
    assert "time.sleep(60)" in problems[0]


def test_a_session_started_with_a_runs_tag_belongs_to_that_run() -> None:
    code = "from fastdeploy_patch.testing import leak_guard; print(leak_guard.RUN_TAG)"
    env = {**os.environ, leak_guard.RUN_TAG_VAR: "outer"}
    inner = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert inner.stdout == "outer\n"
    env.pop(leak_guard.RUN_TAG_VAR)
    fresh = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert len(fresh.stdout.strip()) == 32 and fresh.stdout.strip() not in ("outer", leak_guard.RUN_TAG)
