"""What each real rank runs in the creation-fault tests: a rank that never calls, calls late, dies, or hosts the
store and dies, while the others create a signal group with a short ``create_timeout``. Every rank leaves through
``exit_after_reply`` (the tests ask for fresh worlds): a rank whose creation failed is out of step for good.

The ranks coordinate the test itself through keys of their own (``test/...``) in Paddle's global store. Rank 0 hosts
that store, so it leaves last: the others' requests would fail with a reset connection once it is gone.
"""

from __future__ import annotations

import os
import time
from typing import NoReturn

import paddle.distributed as dist

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import broadcast_signal, liveness, new_signal_group, rendezvous
from fastdeploy_patch.testing import exit_after_reply

LEAVE_LIMIT_S = 60.0
"""How long rank 0 keeps the store up at most for the others to leave: a hang guard only."""


def attempt(**kwargs: object) -> dict:
    """Create a signal group with ``kwargs`` and say what happened: its transport and one broadcast's value, or the
    error's type and message; when it ended (wall clock, to compare across ranks) and how long it took."""
    started = time.monotonic()
    try:
        group = new_signal_group(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the report names whatever was raised
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "elapsed": time.monotonic() - started,
            "at": time.time(),
        }
    with group:
        value = broadcast_signal(7, src=0, group=group)
        return {"type": None, "transport": group.transport, "value": value, "elapsed": time.monotonic() - started}


def _count(key: str, at_least: int, limit: float = LEAVE_LIMIT_S) -> int:
    store = paddle_internals.global_store()
    deadline = time.monotonic() + limit
    while (count := store.add(key, 0)) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return count


def leave(report: dict, staying: int) -> NoReturn:
    """Reply ``report`` and exit; rank 0 first waits (a bounded while) until ``staying`` other ranks have left."""
    if dist.get_rank() == 0:
        _count("test/left", staying)
    else:
        paddle_internals.global_store().add("test/left", 1)
    exit_after_reply({"rank": dist.get_rank(), **report})


def missing_then_late(*, absent: int, create_timeout: float, late_timeout: float) -> NoReturn:
    """Every rank but ``absent`` creates (and fails, for want of it), then tries again; ``absent`` calls only once the
    others have failed twice, with a long ``late_timeout``."""
    rank, others = dist.get_rank(), dist.get_world_size() - 1
    store = paddle_internals.global_store()
    if rank == absent:
        _count("test/failed", others)
        late = attempt(create_timeout=late_timeout)
        leave({"late": late}, others)
    first = attempt(create_timeout=create_timeout)
    again = attempt(create_timeout=late_timeout)
    store.add("test/failed", 1)
    leave({"first": first, "again": again}, others)


def late_in_time(*, late: int, delay: float, create_timeout: float) -> NoReturn:
    """``late`` calls ``delay`` seconds after the others, well inside ``create_timeout``: every rank gets the group."""
    if dist.get_rank() == late:
        time.sleep(delay)
    leave({"made": attempt(create_timeout=create_timeout)}, dist.get_world_size() - 1)


def dies_in_creation(*, victim: int, when: str, transport: str, create_timeout: float) -> NoReturn:
    """``victim`` (not rank 0) exits before it calls (``when="before"``), or inside the creation (``"handshake"``: in
    the shared-memory handshake after it arrived; ``"store"``: as it connects to the gloo group's own store)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    if rank == victim:
        gone = {"died": when}
        if when == "before":
            exit_after_reply(gone)
        if when == "handshake":
            rendezvous.negotiate_shm = lambda members, creation: exit_after_reply(gone)
        else:
            paddle_internals.open_tcp_store = lambda *args, **kwargs: exit_after_reply(gone)
        attempt(create_timeout=create_timeout, transport=transport)
        raise AssertionError(f"rank {rank} survived its own death in the creation")
    leave({"made": attempt(create_timeout=create_timeout, transport=transport)}, size - 2)


def store_host_dies(*, create_timeout: float, keep_sockets: bool) -> NoReturn:
    """Rank 0, which hosts Paddle's global store, exits inside the shared-memory handshake. With ``keep_sockets`` it
    first forks a child that holds the store's sockets (without serving them) until every other rank has left."""
    rank = dist.get_rank()
    peers: list[liveness.ProcessIdentity] = []
    dist.all_gather_object(peers, liveness.this_process())
    if rank == 0:

        def die(members: list[int], creation: object) -> NoReturn:
            if keep_sockets and os.fork() == 0:
                others = peers[1:]
                deadline = time.monotonic() + LEAVE_LIMIT_S
                while not all(map(liveness.gone_reason, others)) and time.monotonic() < deadline:
                    time.sleep(0.05)
                os._exit(0)
            exit_after_reply({"rank": rank, "died_at": time.time()})

        rendezvous.negotiate_shm = die
    made = attempt(create_timeout=create_timeout, transport="shm")
    exit_after_reply({"rank": rank, "made": made})


def many_gloo_groups(*, creations: int) -> dict:
    """``creations`` gloo signal groups one after the other, each broadcasting once; returns the values and, on rank
    0, the address each group's own store listened on."""
    rank = dist.get_rank()
    store = paddle_internals.global_store()
    values, ports = [], []
    for number in range(1, creations + 1):
        with new_signal_group(transport="gloo", create_timeout=60) as group:
            values.append(broadcast_signal(number, src=number % 2, group=group))
        if rank == 0:
            address = bytes(store.get(f"fastdeploy_patch/signal_group/{number}/gloo/address")).decode()
            ports.append(int(address.rsplit(":", 1)[1]))
    return {"rank": rank, "values": values, "ports": ports}
