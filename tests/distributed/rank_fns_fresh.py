"""Rank functions for ``test_fresh_worlds``: what a rank can tell about how it was started."""

from __future__ import annotations

import os
import time


def origin() -> dict:
    return {"pid": os.getpid(), "ppid": os.getppid(), "omp": os.environ.get("OMP_NUM_THREADS")}


def wait() -> None:
    time.sleep(600)
