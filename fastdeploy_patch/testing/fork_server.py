"""The warm parent's side of ``warm_parent``: what runs in the parent process (``serve``), and in each rank it forks
until the rank's entry starts. It imports Paddle once, then only forks, with one thread, and reports how each rank
ended; ``warm_parent`` explains why and is the test process's side."""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fastdeploy_patch import procfs

ENTRIES = ("fastdeploy_patch.testing.rank_entry", "fastdeploy_patch.testing.pool_rank")
"""The modules whose ``main(argv)`` a forked rank may run; the parent imports them (and so Paddle) once."""

MESSAGE_BYTES = 1 << 20
"""The largest message either side sends (a fork request carries a rank's environment)."""
_MAX_FDS = 16
_PR_SET_PDEATHSIG = 1


def serve(argv: list[str], entries: Sequence[str] = ENTRIES, warm_up: Callable[[], object] | None = None) -> int:
    """The warm parent's life: import Paddle (``warm_up``, by default ``rank_imports.import_paddle``) and
    ``entries``, say ready, fork ranks on request and report how each ended, until the test process hangs up
    (returns 0). In a forked rank, returns the rank's own exit code."""
    sock = socket.socket(fileno=int(argv[0]))
    from fastdeploy_patch.testing import rank_entry, rank_imports

    (warm_up or rank_imports.import_paddle)()
    for name in entries:
        importlib.import_module(name)
    # Paddle's import put C++ handlers on the fatal signals and SIGTERM: ranks inherit faulthandler's and coverage's.
    rank_entry.reclaim_signal_handlers()
    # What the imports made is shared by every fork, copy-on-write: the collector of a rank need not walk it.
    gc.collect()
    gc.freeze()
    _send(sock, {"kind": "ready", "pid": os.getpid()})
    rank = _serve_forks(sock)
    return 0 if rank is None else rank()


def _serve_forks(sock: socket.socket) -> Callable[[], int] | None:
    children: dict[int, int] = {}  # pidfd -> pid
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    raw, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, _MAX_FDS)
                    if not raw:
                        return None
                    rank = _fork(sock, pickle.loads(raw), fds, selector, children)
                    if rank is not None:
                        return rank
                else:
                    pidfd = key.fd
                    pid = children.pop(pidfd)
                    selector.unregister(pidfd)
                    os.close(pidfd)
                    _, status = os.waitpid(pid, 0)
                    _send(sock, {"kind": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork(
    sock: socket.socket,
    request: dict[str, Any],
    fds: list[int],
    selector: selectors.BaseSelector,
    children: dict[int, int],
) -> Callable[[], int] | None:
    count = procfs.threads("self")
    if count != 1:
        for fd in fds:
            os.close(fd)
        _send(sock, {"kind": "refused", "error": f"the warm parent holds {count} threads; it forks only with one"})
        return None
    parent = os.getpid()
    in_session, said = os.pipe()
    pid = os.fork()
    if pid == 0:
        selector.close()
        for pidfd in children:
            os.close(pidfd)
        sock.close()
        os.close(in_session)
        return _become_rank(request, fds, parent, said)
    os.close(said)
    for fd in fds:
        os.close(fd)
    # The test process kills a rank by its session: the rank is reported once it leads one (or has died trying).
    os.read(in_session, 1)
    os.close(in_session)
    pidfd = os.pidfd_open(pid)
    children[pidfd] = pid
    selector.register(pidfd, selectors.EVENT_READ)
    _send(sock, {"kind": "forked", "pid": pid, "threads": count})
    return None


def _become_rank(request: dict[str, Any], fds: list[int], parent: int, said: int) -> Callable[[], int]:
    """In the forked child: the rank's session (said on the descriptor ``said``), death with the parent, output,
    environment and arguments; returns the call that runs its entry."""
    os.setsid()
    os.write(said, b".")
    os.close(said)
    die_with(parent)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    numbers = dict(zip(request["fds"], (str(fd) for fd in fds), strict=True))
    argv = [numbers.get(arg, arg) for arg in request["argv"]]
    sys.argv = ["-c", *argv]
    main = importlib.import_module(request["entry"]).main
    return lambda: main(argv)


def die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies, and leave at once (exit 1) if it already has."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before the request was made: the kernel would never send the signal then. Leaving by
    # SystemExit unwinds a fork that has run nothing of its own yet, and lets coverage save what it measured.
    if os.getppid() != parent:
        raise SystemExit(1)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(pickle.dumps(message))
