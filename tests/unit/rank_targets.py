"""Rank-side functions for the launcher's unit tests: they run in real child processes without a process group."""

from __future__ import annotations

import os
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
