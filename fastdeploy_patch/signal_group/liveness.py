"""Whether a process on this host is still alive, told from ``/proc`` without signalling it.

A process is named by its pid, its start time (``/proc/<pid>/stat`` field 22, in clock ticks since boot) and its
PID namespace (the inode of ``/proc/self/ns/pid``). The start time tells a reused pid apart from the process we
knew. Where it cannot work: a peer in another PID namespace (another container) has a pid that means nothing
here, so it is never judged; only a timeout then bounds a wait on it (with ``timeout=None``, 300 s per call). The
same holds where ``/proc`` cannot be read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC = "/proc"

# /proc/<pid>/stat fields after the ")" closing the command name: field 3 (state) is the first, field 22
# (starttime) the twentieth.
_STATE_FIELD = 0
_START_FIELD = 19


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as other processes can recognise it; ``pid_namespace`` 0 means unknown."""

    pid: int
    start_ticks: int
    pid_namespace: int


def _stat_fields(pid: int) -> list[str]:
    with open(f"{PROC}/{pid}/stat", encoding="ascii", errors="replace") as stat:
        # The command name may hold spaces and parentheses; it ends at the last ")".
        return stat.read().rsplit(")", 1)[1].split()


def _pid_namespace() -> int:
    try:
        return os.stat(f"{PROC}/self/ns/pid").st_ino
    except OSError:
        return 0


def this_process() -> ProcessIdentity:
    """The calling process's identity, as it is recorded for the other members. Without a readable ``/proc`` the
    namespace is unknown (0), so that nobody ever judges this process: only timeouts then bound a wait on it."""
    pid = os.getpid()
    try:
        start = int(_stat_fields(pid)[_START_FIELD])
    except OSError:
        return ProcessIdentity(pid, 0, 0)
    return ProcessIdentity(pid, start, _pid_namespace())


def can_judge(peer: ProcessIdentity) -> bool:
    """Whether ``gone_reason`` can ever tell that ``peer`` exited, from here: it lives in this PID namespace, and
    ``/proc`` can be read."""
    return peer.pid_namespace != 0 and peer.pid_namespace == _pid_namespace()


def gone_reason(peer: ProcessIdentity) -> str | None:
    """Why ``peer`` is known to have exited, or None when it is alive or cannot be judged from here."""
    here = _pid_namespace()
    if peer.pid_namespace == 0 or peer.pid_namespace != here:
        return None
    try:
        fields = _stat_fields(peer.pid)
    except (FileNotFoundError, ProcessLookupError):
        return f"process {peer.pid} is gone"
    if int(fields[_START_FIELD]) != peer.start_ticks:
        return f"process {peer.pid} is gone (its pid now belongs to another process)"
    if fields[_STATE_FIELD] in ("Z", "X"):
        return f"process {peer.pid} has exited"
    return None
