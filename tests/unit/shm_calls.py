"""One whole call on a bare transport end, numbered as its ``SignalGroup`` numbers it: the unit tests drive ends
without a group."""

from __future__ import annotations

from fastdeploy_patch.signal_group.shm_transport import ShmTransport


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
