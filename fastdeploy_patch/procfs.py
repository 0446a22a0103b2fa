"""Every read of Linux ``/proc`` the package and its tests make, but for ``signal_group.store_sockets``' own socket
table: a process's ``stat`` fields, children, command line, environment, open descriptors, thread count, resident
size and mappings, this process's PID namespace, and the mount table.

Every function takes ``root``, the ``/proc`` to read (a test passes a fake directory). A process is named by its pid
(an ``int``) or ``"self"``; anything else is a ``TypeError``, before any read. A process that cannot be seen in
``root`` reads as None: it has exited and been reaped, or ``root`` is not mounted at all. A caller that must tell
those two apart asks ``pid_namespace()`` first, which is 0 when ``root`` cannot be read. Any other ``OSError``
(another user's process, for the files the kernel guards) reaches the caller.
"""

from __future__ import annotations

import os
import re
from typing import Literal, NamedTuple

ROOT = "/proc"

Pid = int | Literal["self"]

STAT_READ_BYTES = 4096
"""One read of a ``stat`` file takes it whole: its line is at most about 1.2 KB (a 16-byte command name and 52
numbers), and the kernel hands such a file over in one read."""

# The fields of a stat line after the ")" that closes the command name: field 3 (state) comes first.
_STATE, _PPID, _SESSION, _START_TICKS = 0, 1, 3, 19
_ESCAPED = re.compile(r"\\([0-7]{3})")


class Stat(NamedTuple):
    """What ``/proc/<pid>/stat`` says about a process, in the kernel's terms."""

    comm: str
    """The command name (at most 15 bytes; it may hold spaces and parentheses)."""
    state: str
    """``R``, ``S``, ``D``, ``T``, ``t``, ``Z`` (exited, not yet reaped), ``X`` (dead), ..."""
    ppid: int
    session: int
    start_ticks: int
    """When the process started, in clock ticks since boot: with the pid, it tells a reused pid apart."""


class Mount(NamedTuple):
    """One line of the mount table."""

    target: str
    """Where it is mounted (the kernel's octal escapes of spaces and the like undone)."""
    fs_type: str


def _dir(pid: Pid, root: str) -> str:
    if type(pid) is not int and pid != "self":
        raise TypeError(f"pid must be an int or 'self', got {pid!r} ({type(pid).__name__})")
    return f"{root}/{pid}"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def pid_namespace(*, root: str = ROOT) -> int:
    """The inode of this process's PID namespace (``self/ns/pid``); 0 when ``root`` cannot be read."""
    try:
        return os.stat(f"{root}/self/ns/pid").st_ino
    except OSError:
        return 0


def stat(pid: Pid, *, root: str = ROOT) -> Stat | None:
    """Process ``pid``'s stat line, read with one open and one read (``liveness`` calls this from the transport's
    waits); None when the process cannot be seen. ``ValueError`` when the file is not a stat line."""
    path = f"{_dir(pid, root)}/stat"
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        text = os.read(fd, STAT_READ_BYTES).decode(errors="surrogateescape")
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    # The command name may hold spaces and parentheses of its own: it ends at the last ")".
    head, closed, tail = text.rpartition(")")
    _, opened, comm = head.partition("(")
    fields = tail.split()
    if not (opened and closed and len(fields) > _START_TICKS):
        raise ValueError(f"{path} does not hold a process's stat line: {text!r}")
    return Stat(comm, fields[_STATE], int(fields[_PPID]), int(fields[_SESSION]), int(fields[_START_TICKS]))


def children(pid: Pid, *, root: str = ROOT) -> list[int] | None:
    """The pids of the processes that ``pid``'s threads started and that have not been reaped (zombies included),
    sorted; None when ``pid`` cannot be seen. Needs a kernel built with ``CONFIG_PROC_CHILDREN``, as the common
    distributions' are."""
    tasks = f"{_dir(pid, root)}/task"
    try:
        threads = os.listdir(tasks)
    except (FileNotFoundError, ProcessLookupError):
        return None
    found = []
    for thread in threads:
        # A thread that ended since the listing has no children left to report.
        listed = _read(f"{tasks}/{thread}/children")
        found += [int(child) for child in (listed or b"").split()]
    return sorted(found)


def cmdline(pid: Pid, *, root: str = ROOT) -> list[str] | None:
    """Process ``pid``'s arguments; None when it cannot be seen. Empty for a kernel thread, a zombie, and a process
    inside ``execve`` (which ``subprocess.Popen`` may already have returned from)."""
    data = _read(f"{_dir(pid, root)}/cmdline")
    if data is None:
        return None
    # Each argument ends in a NUL; a process that rewrote its arguments may have left off the last one.
    return [os.fsdecode(arg) for arg in data.removesuffix(b"\0").split(b"\0")] if data else []


def environ(pid: Pid, *, root: str = ROOT) -> dict[str, str] | None:
    """The environment process ``pid`` started with (entries without ``=`` left out; empty when ``cmdline`` is);
    None when it cannot be seen. ``PermissionError`` for another user's process."""
    data = _read(f"{_dir(pid, root)}/environ")
    if data is None:
        return None
    pairs = (entry.partition(b"=") for entry in data.split(b"\0"))
    return {os.fsdecode(name): os.fsdecode(value) for name, eq, value in pairs if eq}


def fds(pid: Pid, *, root: str = ROOT) -> list[int] | None:
    """The descriptors open in process ``pid``, sorted; None when it cannot be seen. For this process, the
    descriptor that listing them opened (and has closed again) is left out."""
    try:
        listed = sorted(int(fd) for fd in os.listdir(f"{_dir(pid, root)}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    if pid not in ("self", os.getpid()):
        return listed
    return [fd for fd in listed if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def fd_path(pid: Pid, fd: int, *, root: str = ROOT) -> str:
    """The path through which another process of the same user can open descriptor ``fd`` of process ``pid`` (a
    memfd, say): it opens the file itself, not a copy of the descriptor."""
    if type(fd) is not int:
        raise TypeError(f"fd must be an int, got {fd!r} ({type(fd).__name__})")
    return f"{_dir(pid, root)}/fd/{fd}"


def root_path(pid: Pid, path: str, *, root: str = ROOT) -> str:
    """Where the absolute ``path`` of process ``pid``'s mount namespace (its ``/dev/shm``, say) is seen from here."""
    if not path.startswith("/"):
        raise ValueError(f"path must be absolute, got {path!r}")
    return f"{_dir(pid, root)}/root{path}"


def rss_bytes(pid: Pid, *, root: str = ROOT) -> int | None:
    """Process ``pid``'s resident memory in bytes (``statm``); None when it cannot be seen."""
    data = _read(f"{_dir(pid, root)}/statm")
    if data is None:
        return None
    return int(data.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def threads(pid: Pid, *, root: str = ROOT) -> int | None:
    """How many threads process ``pid`` runs (``Threads:`` in its ``status``); None when it cannot be seen."""
    data = _read(f"{_dir(pid, root)}/status")
    if data is None:
        return None
    return next(int(line.split()[1]) for line in data.splitlines() if line.startswith(b"Threads:"))


def mapped_paths(pid: Pid, *, root: str = ROOT) -> list[str] | None:
    """The file of each of process ``pid``'s mappings that has one, as the kernel names it (a removed file ends in
    `` (deleted)``), in address order; None when it cannot be seen."""
    data = _read(f"{_dir(pid, root)}/maps")
    if data is None:
        return None
    columns = (line.split(maxsplit=5) for line in os.fsdecode(data).splitlines())
    return [fields[5] for fields in columns if len(fields) == 6]


def pids(*, root: str = ROOT) -> list[int]:
    """Every process that can be seen in ``root``, sorted. ``OSError`` when ``root`` cannot be listed: a process
    table that cannot be read is never taken for an empty one."""
    return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def mounts(*, root: str = ROOT) -> list[Mount]:
    """This process's mount table, in the order the kernel lists it (a later mount on the same target hides the
    earlier ones). ``OSError`` when it cannot be read."""
    with open(f"{root}/self/mounts", "rb") as table:
        lines = os.fsdecode(table.read()).splitlines()
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            found.append(Mount(_ESCAPED.sub(lambda code: chr(int(code[1], 8)), fields[1]), fields[2]))
    return found
