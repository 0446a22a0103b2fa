"""Whether a process on this host is still alive, told from ``/proc`` (through ``fastdeploy_patch.procfs``) without
signalling it.

A process is named by its pid, its start time (``/proc/<pid>/stat`` field 22, in clock ticks since boot) and its
PID namespace (the inode of ``/proc/self/ns/pid``). The start time tells a reused pid apart from the process we
knew. Where it cannot work: a peer in another PID namespace (another container) has a pid that means nothing
here, so it is never judged; only a timeout then bounds a wait on it (with ``timeout=None``, 300 s per call). The
same holds where ``/proc`` cannot be read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fastdeploy_patch import procfs

PROC = procfs.ROOT
"""The ``/proc`` this module judges from (tests point it at a fake one)."""


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as other processes can recognise it; ``pid_namespace`` 0 means unknown."""

    pid: int
    start_ticks: int
    pid_namespace: int


def this_process() -> ProcessIdentity:
    """The calling process's identity, as it is recorded for the other members. Without a readable ``/proc`` the
    namespace is unknown (0), so that nobody ever judges this process: only timeouts then bound a wait on it."""
    pid = os.getpid()
    try:
        me = procfs.stat(pid, root=PROC)
    except OSError:
        me = None
    if me is None:
        return ProcessIdentity(pid, 0, 0)
    return ProcessIdentity(pid, me.start_ticks, procfs.pid_namespace(root=PROC))


def can_judge(peer: ProcessIdentity) -> bool:
    """Whether ``gone_reason`` can ever tell that ``peer`` exited, from here: it lives in this PID namespace, and
    ``/proc`` can be read."""
    return peer.pid_namespace != 0 and peer.pid_namespace == procfs.pid_namespace(root=PROC)


def gone_reason(peer: ProcessIdentity) -> str | None:
    """Why ``peer`` is known to have exited, or None when it is alive or cannot be judged from here."""
    here = procfs.pid_namespace(root=PROC)
    if peer.pid_namespace == 0 or peer.pid_namespace != here:
        return None
    now = procfs.stat(peer.pid, root=PROC)
    if now is None:
        return f"process {peer.pid} is gone"
    if now.start_ticks != peer.start_ticks:
        return f"process {peer.pid} is gone (its pid now belongs to another process)"
    if now.state in ("Z", "X"):
        return f"process {peer.pid} has exited"
    return None
