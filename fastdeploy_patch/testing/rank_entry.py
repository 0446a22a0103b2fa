"""What each rank started by ``fastdeploy_patch.testing.launcher`` runs, through ``launcher.RANK_BOOTSTRAP``."""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from fastdeploy_patch.testing import rank_calls, rank_imports

READY_SUFFIX = ".ready"
"""Beside its result file, the file a launched rank creates once it joined the world and imported its target."""
MASTER_WAIT_S = 60.0
"""How long a rank other than 0 waits for rank 0's rendezvous store to listen before it joins anyway (Paddle's
own connect timeout then applies)."""
MASTER_POLL_S = 0.01
PORT_TAKEN_EXIT = 75
"""The exit code of a rank 0 that found its master port taken before joining: the rank pool starts the world again
on other ports (test processes side by side pick ports that were free a moment before, not reserved)."""


class PortTaken(RuntimeError):
    """Another process listens on the port this rank 0 was told to serve the world's store on."""


def join_world() -> None:
    """Join the world of ``PADDLE_TRAINERS_NUM`` ranks with ``init_parallel_env()`` (a world of one has nothing to
    join). Ranks other than 0 first wait until rank 0's store (``PADDLE_MASTER``) listens: one that connects
    before it does sleeps 3 s in Paddle's TCPStore client before trying again, and ranks started together nearly
    always do, which made every launch and pool start here 3 s slower than its imports.

    With ``PADDLE_MASTER`` set, Paddle's global store is made first (every rank connected to it once it returns) and
    its connections are set to send without delay (``store_without_delay``): the gloo group that
    ``init_parallel_env()`` makes next rendezvouses on that store in several small requests, each held back tens of
    milliseconds by Nagle's algorithm otherwise (a fresh 2-rank world's call took 0.42 s, 0.17 s without)."""
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) <= 1:
        return
    master = os.environ.get("PADDLE_MASTER")
    if master and os.environ.get("PADDLE_TRAINER_ID", "0") != "0":
        wait_for_master(master)
    elif master:
        check_port_free(master)
    import paddle.distributed as dist

    if master:
        from fastdeploy_patch import paddle_internals
        from fastdeploy_patch.signal_group import store_without_delay

        paddle_internals.global_store()
        store_without_delay(int(master.rsplit(":", 1)[1]))
    dist.init_parallel_env()


def wait_for_master(endpoint: str, wait_s: float = MASTER_WAIT_S) -> bool:
    """Wait until ``endpoint`` (``host:port``) accepts a TCP connection, which is closed at once; returns whether it
    did within ``wait_s`` seconds."""
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(MASTER_POLL_S)


def check_port_free(endpoint: str) -> None:
    """Raise ``PortTaken`` unless this process could bind ``endpoint`` (``host:port``) as the store does (with
    ``SO_REUSEADDR``): Paddle's store aborts the process, with no Python error, when its port is taken."""
    host, port = endpoint.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            raise PortTaken(f"the master port {endpoint} is taken by another process: {exc}") from None


def reclaim_signal_handlers() -> None:
    """Take back the signal handlers that ``import paddle`` replaced with C++ ones of its own (call it once Paddle
    is imported; harmless before).

    - Fatal signals: faulthandler again (its ``enable`` alone does nothing while it believes it is enabled), so a
      crash writes every thread's Python stack to stderr, the rank's log; Paddle's handler prints none.
    - SIGTERM: the Python-level handler (coverage's, when measuring), so that a rank the launcher kills still
      saves its coverage data.
    """
    faulthandler.disable()
    faulthandler.enable(all_threads=True)
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))


def main(argv: list[str]) -> int:
    """Join the distributed world (when it has more than one rank), run the spec's target, and write its JSON
    result. Returns the exit code: 0, or 1 after printing the target's traceback."""
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    module_name, func_name = spec["target"].split(":", 1)
    try:
        rank_imports.import_paddle()
        join_world()
        target = getattr(importlib.import_module(module_name), func_name)
        reclaim_signal_handlers()
        # The launcher counts the call's timeout from the moment every rank is here.
        Path(result_path + READY_SUFFIX).touch()
        rank_calls.set_reply_delivery(lambda result, code: write_result(result_path, result))
        result = target(**spec["kwargs"])
    except BaseException:  # noqa: BLE001 - any failure, SystemExit included, is reported to the launcher
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        rank_calls.set_reply_delivery(None)
    write_result(result_path, result)
    return 0


def write_result(result_path: str, result: object) -> None:
    """Write ``result`` as JSON to ``result_path`` in one step: the launcher never reads half a file."""
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
