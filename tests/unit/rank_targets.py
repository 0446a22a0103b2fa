"""Rank-side functions for the launcher's unit tests: they run in real child processes without a process group."""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path


def echo(value: int) -> dict:
    return {"value": value, "rank": int(os.environ["PADDLE_TRAINER_ID"])}


def fail(message: str) -> None:
    raise ValueError(message)


def sleep_forever(ready: str | None = None) -> None:
    if ready is not None:
        Path(ready).touch()
    time.sleep(600)


def import_paddle() -> None:
    import paddle  # noqa: F401 - the import is the point: a test makes it block


def environment(names: list[str]) -> dict:
    return {name: os.environ.get(name) for name in names}


def _idle(started: threading.Event) -> None:
    started.set()
    time.sleep(600)


def crash_on_purpose() -> None:
    """Die of SIGSEGV, as a fault in native code would, while a second thread idles in ``_idle``."""
    started = threading.Event()
    threading.Thread(target=_idle, args=(started,), name="idler", daemon=True).start()
    started.wait()
    faulthandler._sigsegv()
