"""Checks of what callers pass to the signal group, run before any communication: each names the bad value and
what was expected."""

from __future__ import annotations

import datetime
import numbers
from collections.abc import Sequence

import numpy as np

from fastdeploy_patch.signal_group.shm_layout import SHM_RING_SLOTS

GLOO_OP_TIMEOUT_S = 30.0
"""Paddle 3.3 builds every gloo process group with this fixed op timeout and ignores ``new_group(timeout=...)``."""

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

MAX_TIMEOUT_S = 86_400.0
"""The longest timeout a group accepts (one day): longer than any weight reload, short enough to catch a typo."""

MAX_LOOKAHEAD = SHM_RING_SLOTS // 2
"""The deepest lookahead: half the ring, so the src can still run ahead of the slowest reader by as much."""

TRANSPORTS = ("auto", "shm", "gloo")


def timeout_seconds(timeout: object, transport: str) -> float | None:
    """``timeout`` (seconds or a timedelta) as float seconds; at most a day, and at most gloo's 30 s for gloo. None
    stays None: no bound of ours (shared memory waits while every peer is alive; gloo keeps its own 30 s)."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be None, seconds (int or float) or a datetime.timedelta, got {timeout!r}")
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout must be > 0 and <= {MAX_TIMEOUT_S:g} s (one day), got {timeout!r}")
    if transport == "gloo" and seconds > GLOO_OP_TIMEOUT_S:
        raise ValueError(
            f"timeout must be <= {GLOO_OP_TIMEOUT_S:g} s with transport='gloo', got {timeout!r}: Paddle's gloo "
            f"backend fails every op after a fixed {GLOO_OP_TIMEOUT_S:g} s; use transport='shm' (ranks on one host) "
            "for a longer one, or timeout=None"
        )
    return seconds


def member_ranks(ranks: object, world_size: int) -> list[int]:
    """The sorted global ranks of the group (default: the whole world)."""
    if ranks is None:
        return list(range(world_size))
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"ranks must be a sequence of global ranks, got {ranks!r}")
    for rank in ranks:
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool):
            raise TypeError(f"ranks must hold integers, got {rank!r} in {ranks!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} in {ranks!r} is outside the world of {world_size} ranks")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must not repeat, got {ranks!r}")
    return sorted(int(rank) for rank in ranks)


def transport_name(transport: object) -> str:
    """``transport`` when it is one of ``TRANSPORTS``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {transport!r}")
    return transport


def lookahead_steps(lookahead: object, transport: str) -> int:
    """``lookahead`` as an int in ``0..MAX_LOOKAHEAD``; above 0 only on shared memory."""
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)):
        raise TypeError(f"lookahead must be an integer number of calls, got {lookahead!r}")
    if not 0 <= lookahead <= MAX_LOOKAHEAD:
        raise ValueError(f"lookahead must be between 0 and {MAX_LOOKAHEAD} calls (half the ring), got {lookahead!r}")
    if lookahead and transport == "gloo":
        raise ValueError(
            f"lookahead {lookahead} needs the shared-memory transport, but transport='gloo' was asked for: gloo is a "
            "collective in lockstep; use transport='shm' or 'auto' with every rank on one host"
        )
    return int(lookahead)


def int32(value: object, what: str = "signal value") -> int:
    """``value`` as an int when it is an integer in int32 range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer (int or numpy integer), got {value!r}")
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{what} {value!r} is outside int32 range [{INT32_MIN}, {INT32_MAX}]")
    return int(value)


def src_rank(src: object) -> int:
    """``src`` as an int when it is an integer."""
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)):
        raise TypeError(f"src must be an integer global rank, got {src!r}")
    return int(src)


CREATE_TIMEOUT_S = 300.0
"""The default ``create_timeout``: how long every rank waits in ``new_signal_group`` for the others. Long enough for
a rank that still loads its weights when the others call; a rank that never comes is reported after it."""

GLOO_PORTS_ENV = "FASTDEPLOY_PATCH_GLOO_PORTS"
"""``LOW-HIGH``: the ports a gloo signal group's own rendezvous store may listen on (any free port when unset)."""


def create_timeout_seconds(create_timeout: object) -> float:
    """``create_timeout`` (seconds or a timedelta) as float seconds, above 0 and at most a day."""
    if isinstance(create_timeout, datetime.timedelta):
        seconds = create_timeout.total_seconds()
    elif isinstance(create_timeout, numbers.Real) and not isinstance(create_timeout, bool):
        seconds = float(create_timeout)
    else:
        raise TypeError(
            f"create_timeout must be seconds (int or float) or a datetime.timedelta, got {create_timeout!r}"
        )
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"create_timeout must be > 0 and <= {MAX_TIMEOUT_S:g} s (one day), got {create_timeout!r}")
    return seconds


def gloo_ports(text: str | None) -> range | None:
    """The port range that ``GLOO_PORTS_ENV`` holds (``LOW-HIGH``, both included, 1 <= LOW <= HIGH <= 65535); None
    when it is unset or empty."""
    if not text:
        return None
    low, sep, high = text.partition("-")
    if sep and low.strip().isdigit() and high.strip().isdigit():
        first, last = int(low), int(high)
        if 1 <= first <= last <= 65535:
            return range(first, last + 1)
    raise ValueError(
        f"{GLOO_PORTS_ENV} must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535 (the TCP ports a gloo signal group's "
        f"rendezvous store may listen on, for example 29500-29599), got {text!r}"
    )
