"""What each rank of a rank pool (``rank_pool``) runs, through ``rank_pool.POOL_RANK_BOOTSTRAP``: join the world
once, then serve calls from the controller until it hangs up.

Messages are pickles (``pickles``), one per ``Connection.send_bytes``. The controller sends a call
``{"module", "qualname", "file", "kwargs", "sys_path"}``; the rank answers ``{"status": "ready", "at": T}`` once
after joining (``T``: its ``time.monotonic()``, the same clock as the controller's), then one reply per call:
``{"status": "ok", "result": PICKLE, "exit_code": None | int, "left_behind": [...]}`` (``exit_code`` set when the
function left through ``exit_after_reply``; ``left_behind`` names the threads and child processes the call left
running), or ``{"status": "raised" | "skipped" | "leftovers", "error": TEXT}``. After every call the rank puts back
the state it had when it joined (``rank_state``), collects garbage and looks for signal groups the call left open.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

# Imported with this module, so before any rank's baseline is taken: the package imports numpy, whose import adds
# warnings filters; first imported inside a call, numpy's state and those filters would differ between a pool's first
# call and the next ones.
import fastdeploy_patch.signal_group  # noqa: F401
from fastdeploy_patch.testing import pickles, rank_calls, rank_entry, rank_imports, rank_state

_SIGNAL_GROUP_MODULE = "fastdeploy_patch.signal_group.group"
SKIP_IN_RANK = (
    "a rank cannot skip a test: its skip would never reach pytest, and counting the call as passed would hide that "
    "nothing was checked; skip in the test process, before paddle_ranks.run()"
)


def main(argv: list[str]) -> int:
    """Join the world (``init_parallel_env`` when it has more than one rank) on the connection's file descriptor
    ``argv[0]``, then serve calls. Returns the exit code: 0 when the controller hung up, 1 when joining failed,
    ``rank_entry.PORT_TAKEN_EXIT`` when another process holds the master's port (the pool starts again elsewhere)."""
    conn = Connection(int(argv[0]))
    try:
        join_world()
    except rank_entry.PortTaken as exc:
        print(exc, file=sys.stderr, flush=True)
        return rank_entry.PORT_TAKEN_EXIT
    except BaseException:  # noqa: BLE001 - any failure to join is this rank's exit, reported through its log
        traceback.print_exc()
        return 1
    # What the import and the rendezvous made lives as long as the rank: the collector need not scan it after every
    # call, and the leftover check sees only what calls made.
    gc.collect()
    gc.freeze()
    return serve(conn)


def join_world() -> None:
    """Import Paddle (``rank_imports.import_paddle``: every rank does, even in a world of one), and join the world
    (``rank_entry.join_world``)."""
    rank_imports.import_paddle()

    rank_entry.join_world()
    # `import paddle` replaced the fatal-signal and SIGTERM handlers with C++ ones: a crash would print no Python
    # stack, and a rank the controller kills would not save its coverage.
    rank_entry.reclaim_signal_handlers()


def serve(conn: Connection) -> int:
    """Record the rank's state (``rank_state.Baseline``), answer ``{"status": "ready"}``, then one reply per call
    until the controller hangs up (returns 0)."""
    baseline = rank_state.Baseline.take()
    _send(conn, {"status": "ready", "at": time.monotonic()})
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:
            return 0
        _send(conn, run_call(pickles.loads(raw), conn, baseline))


def run_call(call: dict[str, Any], conn: Connection, baseline: rank_state.Baseline) -> dict[str, Any]:
    """Run one call, put ``baseline`` back, and return the call's reply; the call's coverage is saved before the
    reply is."""
    where = f"{call['module']}:{call['qualname']}"
    rank_calls.set_reply_delivery(lambda result, code: _send(conn, _ok(result, code, where)))
    running, kept = rank_state.Running.now(), set(rank_calls.kept_groups())
    try:
        fn = resolve(call["module"], call["qualname"], call["file"], call["sys_path"])
        reply = _ok(fn(**call["kwargs"]), None, where)
    except BaseException as exc:  # noqa: BLE001 - everything a call raises is its reply, SystemExit included
        text = traceback.format_exc()
        # In the rank's log too, beside whatever it printed: the controller shows the other ranks' log tails.
        print(text, file=sys.stderr, flush=True)
        if _is_skip(exc):
            reply = {"status": "skipped", "error": text + SKIP_IN_RANK}
        else:
            reply = {"status": "raised", "error": text}
    finally:
        rank_calls.set_reply_delivery(None)
        baseline.restore()
    if reply["status"] == "ok":
        reply["left_behind"] = running.left_behind(threads=set(rank_calls.kept_groups()) <= kept)
    left = open_groups()
    if left and reply["status"] == "ok":
        names = "\n".join(f"  {group!r}" for group in left)
        reply = {
            "status": "leftovers",
            "error": f"{where} left {len(left)} signal group(s) open:\n{names}\nclose them (or use them in a `with` "
            "block), or return keep_open(result, *groups) to keep them for later calls on purpose",
        }
    rank_calls.save_coverage()
    return reply


def resolve(module: str, qualname: str, file: str | None, sys_path: list[str]) -> Any:
    """The object ``module:qualname``, imported as the controller imported it: with the controller's ``sys.path``
    first and, when that name is not importable (pytest's importlib mode), from the controller's ``file``."""
    if sys.path[: len(sys_path)] != sys_path:
        sys.path[:] = sys_path + [entry for entry in sys.path if entry not in sys_path]
    loaded = sys.modules.get(module)
    if loaded is None:
        importlib.invalidate_caches()
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if file is None or not (module == exc.name or module.startswith(f"{exc.name}.")):
                raise
            loaded = _load_file(module, file)
    target: Any = loaded
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _load_file(module: str, file: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module, file)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"cannot load {module} from {file}", name=module)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[module]
        raise
    return loaded


def open_groups() -> list[Any]:
    """Signal groups alive after a full collection that are neither closed nor kept with ``keep_open``.

    None can exist before a call imported the module that defines them, so the scan is skipped until then; after
    ``gc.freeze()`` it walks only objects made since the rank joined.
    """
    module = sys.modules.get(_SIGNAL_GROUP_MODULE)
    if module is None:
        return []
    gc.collect()
    kept = rank_calls.kept_groups()
    return [o for o in gc.get_objects() if isinstance(o, module.SignalGroup) and not o.closed and o not in kept]


def _ok(result: object, exit_code: int | None, where: str) -> dict[str, Any]:
    rank = os.environ.get("PADDLE_TRAINER_ID", "0")
    pickled = pickles.dumps(result, f"rank {rank} cannot send what {where} returned to the test process")
    return {"status": "ok", "result": pickled, "exit_code": exit_code, "left_behind": []}


def _is_skip(exc: BaseException) -> bool:
    # pytest.skip's exception, recognised without importing pytest into every rank: a rank that raised it has pytest.
    outcomes = sys.modules.get("_pytest.outcomes")
    return outcomes is not None and isinstance(exc, outcomes.Skipped)


def _send(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(pickles.dumps(message, "a pool rank's reply"))
