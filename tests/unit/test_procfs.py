"""``fastdeploy_patch.procfs`` on the real ``/proc`` of this process and of children it starts, and on fake ``/proc``
directories for what the kernel would not produce on demand (a missing ``/proc``, a thread that ended mid-listing,
odd file contents)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.procfs import Mount, Stat

PAGE = os.sysconf("SC_PAGE_SIZE")
WAIT_S = 30.0
"""Hang guard for a child to reach the state a test needs; it takes milliseconds."""


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start children (``sleep 60`` unless told otherwise); every one is killed and reaped after the test."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str] | None = None, **options: object) -> subprocess.Popen:
        started.append(subprocess.Popen(argv or ["sleep", "60"], **options))
        return started[-1]

    yield start
    for child in started:
        child.kill()
        child.wait()


def reaped_pid() -> int:
    """The pid of a child that has exited and been reaped: no process has it (pids are handed out in turn)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def wait_for_state(pid: int, states: str) -> Stat:
    deadline = time.monotonic() + WAIT_S
    while (now := procfs.stat(pid)) is None or now.state not in states:
        assert time.monotonic() < deadline, f"process {pid} is not in state {states} after {WAIT_S:g} s: {now}"
        time.sleep(0.005)
    return now


def once_started(read: Callable[[int], list | dict | None], pid: int) -> list | dict:
    """What ``read`` gives for ``pid`` once it has something: ``subprocess.Popen`` returns while the child is still
    inside ``execve``, and until the kernel has laid out the new program's arguments both read as empty."""
    deadline = time.monotonic() + WAIT_S
    while not (found := read(pid)):
        assert found is not None, f"process {pid} cannot be seen"
        assert time.monotonic() < deadline, f"process {pid} shows no {read.__name__} after {WAIT_S:g} s"
        time.sleep(0.005)
    return found


def fake_proc(tmp_path: Path, files: dict[str, str | bytes]) -> str:
    """A ``/proc`` made of ``files`` (path under it -> content)."""
    for rel, content in files.items():
        path = tmp_path / "proc" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    (tmp_path / "proc").mkdir(exist_ok=True)
    return str(tmp_path / "proc")


def stat_line(comm: str, fields_after_comm: int = 50) -> str:
    """A stat line for pid 42: state S, ppid 7, session 9, start time 777, the rest counting up."""
    fields = ["S", "7", "8", "9"] + [str(n) for n in range(10, 25)] + ["777"]
    fields += [str(n) for n in range(fields_after_comm - len(fields))]
    return f"42 ({comm}) {' '.join(fields[:fields_after_comm])}\n"


# --- stat ---------------------------------------------------------------------------------------------------------


def test_stat_of_a_child_names_it_its_parent_and_its_session(spawn: Callable[..., subprocess.Popen]) -> None:
    child = spawn()
    now = wait_for_state(child.pid, "S")
    assert (now.comm, now.ppid, now.session) == ("sleep", os.getpid(), os.getsid(child.pid))


def test_the_start_time_is_when_the_process_started_in_ticks_since_boot(
    spawn: Callable[..., subprocess.Popen],
) -> None:
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    child = spawn()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    started = procfs.stat(child.pid).start_ticks / os.sysconf("SC_CLK_TCK")
    # Ticks are whole hundredths of a second (or coarser): the start may read up to a tick before `before`.
    assert before - 0.05 <= started <= after
    assert procfs.stat("self").start_ticks <= procfs.stat(child.pid).start_ticks


def test_a_command_name_with_spaces_and_parentheses_is_read_whole(
    spawn: Callable[..., subprocess.Popen], tmp_path: Path
) -> None:
    odd = tmp_path / "a) (b c)"
    odd.symlink_to("/bin/sleep")
    child = spawn([str(odd), "60"])
    assert wait_for_state(child.pid, "S").comm == "a) (b c)"


def test_this_process_is_running_while_it_reads_its_own_stat_by_either_name() -> None:
    assert procfs.stat("self") == procfs.stat(os.getpid())
    assert procfs.stat("self").state == "R"


def test_an_exited_child_is_a_zombie_until_it_is_reaped_then_it_cannot_be_seen(
    spawn: Callable[..., subprocess.Popen],
) -> None:
    child = spawn(["true"])
    assert wait_for_state(child.pid, "Z").ppid == os.getpid()
    child.wait()
    assert procfs.stat(child.pid) is None


def test_a_process_reaped_between_the_open_and_the_read_cannot_be_seen(
    spawn: Callable[..., subprocess.Popen], monkeypatch: pytest.MonkeyPatch
) -> None:
    child = spawn()
    real_open = os.open

    def open_then_reap(path: str, flags: int) -> int:
        fd = real_open(path, flags)
        child.kill()
        child.wait()
        return fd

    monkeypatch.setattr(os, "open", open_then_reap)
    assert procfs.stat(child.pid) is None


def test_a_fake_stat_line_is_parsed_from_the_last_parenthesis(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/stat": stat_line("x) (y")})
    assert procfs.stat(42, root=root) == Stat("x) (y", "S", 7, 9, 777)


def test_a_command_name_that_is_not_utf8_is_kept_byte_for_byte(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/stat": stat_line("a\udcffb").encode("utf-8", "surrogateescape")})
    assert os.fsencode(procfs.stat(42, root=root).comm) == b"a\xffb"


def test_twenty_fields_after_the_command_name_are_enough(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/stat": stat_line("x", fields_after_comm=20)})
    assert procfs.stat(42, root=root).start_ticks == 777


@pytest.mark.parametrize(
    "line",
    ["42 (x S 7 8 9", "42 x) " + " ".join(["1"] * 30), stat_line("x", fields_after_comm=19), ""],
    ids=["no-closing-parenthesis", "no-opening-parenthesis", "19-fields", "empty"],
)
def test_a_file_that_is_not_a_stat_line_is_a_value_error_naming_it(tmp_path: Path, line: str) -> None:
    root = fake_proc(tmp_path, {"42/stat": line})
    with pytest.raises(ValueError) as err:
        procfs.stat(42, root=root)
    assert str(err.value) == f"{root}/42/stat does not hold a process's stat line: {line!r}"


def test_a_stat_that_cannot_be_read_is_an_os_error(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/stat/x": ""})
    with pytest.raises(IsADirectoryError):
        procfs.stat(42, root=root)


# --- what cannot be seen, and what is not a pid -------------------------------------------------------------------

PER_PROCESS = [procfs.stat, procfs.children, procfs.cmdline, procfs.environ, procfs.fds, procfs.rss_bytes]
PER_PROCESS += [procfs.mapped_paths, procfs.threads]


@pytest.mark.parametrize("read", PER_PROCESS, ids=lambda read: read.__name__)
def test_a_reaped_process_cannot_be_seen(read: Callable[..., object]) -> None:
    assert read(reaped_pid()) is None


@pytest.mark.parametrize("read", PER_PROCESS, ids=lambda read: read.__name__)
def test_without_a_proc_no_process_can_be_seen(read: Callable[..., object], tmp_path: Path) -> None:
    assert read("self", root=str(tmp_path / "missing")) is None
    assert read(os.getpid(), root=str(tmp_path / "missing")) is None


PER_PID = [*PER_PROCESS, lambda pid, root: procfs.fd_path(pid, 0, root=root)]
PER_PID += [lambda pid, root: procfs.root_path(pid, "/", root=root)]


@pytest.mark.parametrize("read", PER_PID)
@pytest.mark.parametrize("pid", [True, "1", 1.0, None, "../1"])
def test_a_pid_that_is_not_an_int_nor_self_is_a_type_error(
    read: Callable[..., object], pid: object, tmp_path: Path
) -> None:
    with pytest.raises(TypeError) as err:
        read(pid, root=str(tmp_path / "missing"))
    assert str(err.value) == f"pid must be an int or 'self', got {pid!r} ({type(pid).__name__})"


# --- pid namespace ------------------------------------------------------------------------------------------------


def test_the_pid_namespace_is_the_one_the_kernel_names_for_this_process() -> None:
    assert os.readlink("/proc/self/ns/pid") == f"pid:[{procfs.pid_namespace()}]"


def test_without_a_readable_proc_the_pid_namespace_is_unknown(tmp_path: Path) -> None:
    assert procfs.pid_namespace(root=str(tmp_path / "missing")) == 0
    root = fake_proc(tmp_path, {"self/ns/pid": ""})
    assert procfs.pid_namespace(root=root) == os.stat(f"{root}/self/ns/pid").st_ino != 0


# --- children -----------------------------------------------------------------------------------------------------


def test_children_started_by_any_thread_are_found_zombies_too(spawn: Callable[..., subprocess.Popen]) -> None:
    first = spawn()
    from_a_thread: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: from_a_thread.append(spawn()))
    thread.start()
    thread.join()
    exited = spawn(["true"])
    wait_for_state(exited.pid, "Z")
    # The thread has ended, and its children have moved to the main thread; this test's own are a subset.
    found = procfs.children("self")
    assert {first.pid, from_a_thread[0].pid, exited.pid} <= set(found)
    assert found == sorted(found)
    exited.wait()
    assert exited.pid not in procfs.children(os.getpid())


def test_children_of_a_live_thread_are_found(spawn: Callable[..., subprocess.Popen]) -> None:
    started, stop = threading.Event(), threading.Event()
    children: list[subprocess.Popen] = []

    def start_and_stay() -> None:
        children.append(spawn())
        started.set()
        stop.wait(WAIT_S)

    thread = threading.Thread(target=start_and_stay)
    thread.start()
    try:
        assert started.wait(WAIT_S)
        assert children[0].pid in procfs.children("self")
    finally:
        stop.set()
        thread.join()


def test_a_child_has_no_children_of_its_own(spawn: Callable[..., subprocess.Popen]) -> None:
    assert procfs.children(spawn().pid) == []


def test_a_thread_that_ended_during_the_listing_adds_no_children(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/task/42/children": "9 7 ", "42/task/43/children": "8", "42/task/44/stat": ""})
    assert procfs.children(42, root=root) == [7, 8, 9]


# --- command line and environment ---------------------------------------------------------------------------------


def test_the_command_line_is_every_argument_as_given(spawn: Callable[..., subprocess.Popen]) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "a b", "", "c\udcff"]
    child = spawn(argv)
    assert once_started(procfs.cmdline, child.pid) == argv


def test_a_zombie_has_no_command_line(spawn: Callable[..., subprocess.Popen]) -> None:
    child = spawn(["true"])
    wait_for_state(child.pid, "Z")
    assert procfs.cmdline(child.pid) == []


def test_a_rewritten_command_line_without_its_last_nul_keeps_its_last_argument(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/cmdline": b"title: a b\0-x"})
    assert procfs.cmdline(42, root=root) == ["title: a b", "-x"]


def test_the_environment_is_the_one_the_process_started_with(spawn: Callable[..., subprocess.Popen]) -> None:
    child = spawn(env={"A": "1", "B": "x=y", "EMPTY": "", "RAW": "\udcff"})
    assert once_started(procfs.environ, child.pid) == {"A": "1", "B": "x=y", "EMPTY": "", "RAW": "\udcff"}


def test_environment_entries_without_an_equals_sign_are_left_out(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/environ": b"A=1\0junk\0B=\0"})
    assert procfs.environ(42, root=root) == {"A": "1", "B": ""}


# --- descriptors --------------------------------------------------------------------------------------------------


def test_the_descriptors_of_this_process_are_those_open_and_not_the_listings_own() -> None:
    read, write = os.pipe()
    try:
        # The lowest free descriptor is the one the listing opens.
        lowest_free = os.open("/", os.O_RDONLY)
        os.close(lowest_free)
        found = procfs.fds("self")
        assert {0, 1, 2, read, write} <= set(found) and lowest_free not in found
        assert found == sorted(found) and procfs.fds(os.getpid()) == found
    finally:
        os.close(read)
        os.close(write)
    assert read not in procfs.fds("self") and write not in procfs.fds("self")


def test_the_descriptors_of_a_child_are_the_ones_it_got(spawn: Callable[..., subprocess.Popen]) -> None:
    read, write = os.pipe()
    try:
        child = spawn(pass_fds=(write,))
        wait_for_state(child.pid, "S")
        assert procfs.fds(child.pid) == [0, 1, 2, write]
    finally:
        os.close(read)
        os.close(write)


def test_another_process_opens_a_memfd_through_its_fd_path() -> None:
    fd = os.memfd_create("procfs-test")
    try:
        os.write(fd, b"shared")
        path = procfs.fd_path(os.getpid(), fd)
        assert path.startswith("/proc/") and subprocess.run(["cat", path], capture_output=True).stdout == b"shared"
    finally:
        os.close(fd)


@pytest.mark.parametrize("fd", ["3", 3.0, True])
def test_an_fd_that_is_not_an_int_is_a_type_error(fd: object) -> None:
    with pytest.raises(TypeError) as err:
        procfs.fd_path("self", fd)
    assert str(err.value) == f"fd must be an int, got {fd!r} ({type(fd).__name__})"


def test_fd_path_and_root_path_lie_under_the_root_given() -> None:
    assert procfs.fd_path(42, 3, root="/fake") == "/fake/42/fd/3"
    assert procfs.root_path(42, "/dev/shm", root="/fake") == "/fake/42/root/dev/shm"


def test_a_path_of_a_child_is_seen_through_its_root(spawn: Callable[..., subprocess.Popen], tmp_path: Path) -> None:
    (tmp_path / "mark").write_text("here")
    seen = Path(procfs.root_path(spawn().pid, str(tmp_path / "mark")))
    assert seen.read_text() == "here"


def test_a_relative_path_in_a_process_root_is_a_value_error() -> None:
    with pytest.raises(ValueError) as err:
        procfs.root_path("self", "dev/shm")
    assert str(err.value) == "path must be absolute, got 'dev/shm'"


# --- memory -------------------------------------------------------------------------------------------------------


def test_the_resident_size_is_the_one_the_kernel_reports_and_grows_with_touched_memory() -> None:
    status = Path("/proc/self/status").read_text()
    resident_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    before = procfs.rss_bytes("self")
    # Read a moment apart, so within 10% of each other; the shared size (the next field of statm) is far smaller.
    assert abs(before - resident_kib * 1024) < resident_kib * 1024 // 10
    touched = b"x" * (64 * 2**20)
    assert procfs.rss_bytes(os.getpid()) - before >= 60 * 2**20
    del touched


def test_the_thread_count_is_the_kernels_for_another_process() -> None:
    # Another process, not this one: a test process runs threads of its own (xdist's, pytest-timeout's) that come
    # and go while it looks.
    code = (
        "import sys, threading, time\n"
        "for _ in range(int(sys.argv[1])): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    counts = []
    for extra in (0, 2):
        child = subprocess.Popen([sys.executable, "-c", code, str(extra)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "started\n"
            counts.append(procfs.threads(child.pid))
        finally:
            child.kill()
            child.wait()
    assert counts == [1, 3]


def test_the_thread_count_is_read_from_the_status_line_that_names_it(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/status": "Name:\tx\nTgid:\t42\nThreads:\t7\nSigQ:\t0/1\n"})
    assert procfs.threads(42, root=root) == 7


def test_the_resident_size_is_the_second_field_of_statm_in_pages(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"42/statm": "100 3 2 1 0 5 0\n"})
    assert procfs.rss_bytes(42, root=root) == 3 * PAGE


def test_a_mapped_file_is_named_and_marked_deleted_once_removed(tmp_path: Path) -> None:
    path = tmp_path / "a mapped file"
    path.write_bytes(b"\0" * PAGE)
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), PAGE):
        assert str(path) in procfs.mapped_paths("self")
        path.unlink()
        found = procfs.mapped_paths(os.getpid())
        assert f"{path} (deleted)" in found and str(path) not in found


def test_anonymous_mappings_have_no_file(tmp_path: Path) -> None:
    root = fake_proc(
        tmp_path,
        {
            "42/maps": "7f00-7f01 rw-p 00000000 00:00 0 \n"
            "7f01-7f02 r--p 00000000 08:01 12 /usr/lib/a b.so\n"
            "7f02-7f03 rw-p 00000000 00:00 0 [heap]\n"
        },
    )
    assert procfs.mapped_paths(42, root=root) == ["/usr/lib/a b.so", "[heap]"]


# --- the process table and the mount table ------------------------------------------------------------------------


def test_the_process_table_holds_this_process_and_its_live_children(spawn: Callable[..., subprocess.Popen]) -> None:
    child = spawn()
    found = procfs.pids()
    assert {os.getpid(), child.pid} <= set(found) and found == sorted(found)
    child.kill()
    child.wait()
    assert child.pid not in procfs.pids()


def test_the_process_table_is_the_numbered_entries_of_the_root(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"10/stat": "", "9/stat": "", "self/stat": "", "mounts": "", "1x/stat": ""})
    assert procfs.pids(root=root) == [9, 10]


def test_a_process_table_that_cannot_be_listed_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        procfs.pids(root=str(tmp_path / "missing"))


def test_the_mount_table_holds_proc_itself() -> None:
    assert Mount("/proc", "proc") in procfs.mounts()


def test_mount_targets_are_unescaped_and_kept_in_order_and_short_lines_skipped(tmp_path: Path) -> None:
    root = fake_proc(
        tmp_path,
        {
            "self/mounts": "tmpfs /dev/shm tmpfs rw 0 0\n"
            "none /mnt/a\\040b\\134c tmpfs rw 0 0\n"
            "short /x\n"
            "shm /dev/shm ext4\n"
        },
    )
    assert procfs.mounts(root=root) == [
        Mount("/dev/shm", "tmpfs"),
        Mount("/mnt/a b\\c", "tmpfs"),
        Mount("/dev/shm", "ext4"),
    ]


def test_a_mount_target_that_is_not_utf8_is_kept_byte_for_byte(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {"self/mounts": b"none /mnt/a\xffb tmpfs rw 0 0\n"})
    assert procfs.mounts(root=root) == [Mount(os.fsdecode(b"/mnt/a\xffb"), "tmpfs")]


def test_a_mount_table_that_cannot_be_read_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        procfs.mounts(root=str(tmp_path / "missing"))
