"""Rank-side functions for the launcher's unit tests: they run in real child processes without a process group."""

from __future__ import annotations

import os
import time


def echo(value: int) -> dict:
    return {"value": value, "rank": int(os.environ["PADDLE_TRAINER_ID"])}


def fail(message: str) -> None:
    raise ValueError(message)


def sleep_forever() -> None:
    time.sleep(600)
