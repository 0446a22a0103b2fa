"""Helpers for the tests of calls: one whole call on a bare transport end, numbered as its ``SignalGroup`` numbers
it (the unit tests drive ends without a group), and an exception raised into the code under test at a chosen line
(``traced``), as a signal handler's exception or ``KeyboardInterrupt`` lands."""

from __future__ import annotations

import linecache
import sys
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

from fastdeploy_patch.signal_group.shm_transport import ShmTransport

T = TypeVar("T")


def call(end: ShmTransport, value: int | None, src: int) -> int:
    """Call number ``calls_made`` (0 for a fresh end) on ``end``; the number moves on only when the call returns, as
    the group's does, so a call that raised is made again by the next ``call``, through ``resume``."""
    n = getattr(end, "calls_made", 0)
    try:
        result = end.resume(value, src, n) if getattr(end, "ended_early", False) else end.broadcast(value, src, n)
    except BaseException:
        end.ended_early = True
        raise
    end.calls_made, end.ended_early = n + 1, False
    return result


class Injected(Exception):
    """Raised into the code under test by a trace function, as a signal handler's exception would be."""


def traced(fn: Callable[[], T], files: set[str], inject: Callable[[FrameType], bool]) -> tuple[list[str], T]:
    """Run ``fn`` with a line trace over the code in ``files``: return the lines run there (``name:lineno``, one
    per line event) and what ``fn`` returned. At the first line event for which ``inject(frame)`` holds, raise
    ``Injected`` into that frame instead (Python then drops the trace function); the lines run so far are on the
    exception's ``lines``. Restores the trace function that was there before (coverage's)."""
    lines: list[str] = []

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "line":
            where = f"{frame.f_code.co_name}:{frame.f_lineno}"
            if inject(frame):
                error = Injected(where)
                error.lines = lines
                raise error
            lines.append(where)
        return local

    def enter(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename in files else None

    before = sys.gettrace()
    sys.settrace(enter)
    try:
        result = fn()
    finally:
        sys.settrace(before)
    return lines, result


def source_line(frame: FrameType) -> str:
    """The stripped source of the line ``frame`` is about to run."""
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
