"""How the ranks agree on a new signal group: the shared-memory handshake, and the gloo group's own store.

Both run over Paddle's global TCP store (every rank has it after ``init_parallel_env()``) under keys that are
used once: every rank counts group creations in the same order, so creation number k on one rank is creation k on
all. Every rank of the world takes part, members or not, because ``paddle.distributed.new_group`` must be called
by the whole world whenever gloo is chosen, so every rank must reach the same choice. Every wait is bounded by the
creation's deadline and ends early when another rank published a failure (see ``creation``).
"""

from __future__ import annotations

import errno
import json
import math
import os

import paddle.distributed as dist

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import gloo_ports
from fastdeploy_patch.signal_group.creation import STORE_HOST_RANK, Creation
from fastdeploy_patch.signal_group.shm_segment import ShmHandle, ShmRing
from fastdeploy_patch.signal_group.store_sockets import store_without_delay

RENDEZVOUS_TIMEOUT_S = 300
"""The default ``create_timeout`` of ``new_signal_group``, in seconds (this name predates the argument)."""

ATTACHED = "attached"


def global_store_port() -> int | None:
    """The port of Paddle's global TCP store, found as ``init_parallel_env()`` finds it (``MASTER_ADDR`` and
    ``MASTER_PORT``, else ``PADDLE_MASTER``, else the first of ``PADDLE_TRAINER_ENDPOINTS``); None when unknown."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    else:
        endpoint = os.environ.get("PADDLE_MASTER") or os.environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",")[0]
    port = endpoint.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def arrive(creation: Creation) -> None:
    """Collective over the world: return once every rank has called ``new_signal_group`` for this creation."""
    creation.arrive("arrived")
    creation.await_all(
        "arrived",
        creation.world,
        "never arrived: they did not call new_signal_group() for it (every rank of the world must create the same "
        "signal groups in the same order)",
    )


def finish(creation: Creation, step: str) -> None:
    """The last step of a creation: the rank that hosts the global store returns only after every rank has read
    what it needed. Were it to exit at once (a crash at the first step), the others' reads would fail with a reset
    connection. The others need not wait: their last request has been answered."""
    creation.arrive(step)
    if creation.rank == STORE_HOST_RANK:
        creation.await_all(step, creation.world, "did not finish it")


def negotiate_shm(members: list[int], creation: Creation) -> tuple[ShmRing | None, dict[int, str]]:
    """Collective over the world: the first member creates the group's segment, every other member attaches it,
    and each member publishes whether that worked. Every rank reads every member's answer.

    Returns this rank's mapping (None for a non-member, or when any member failed) and ``{rank: reason}`` for the
    members that could not map the segment (empty when every member did). The creator unlinks the segment once
    every member has answered, whatever the outcome, and on every way out of this function, exceptions included (a
    timeout, a reset connection, another rank's failure, an interrupt): nothing is left in /dev/shm after this
    returns or raises, and a member that raises keeps no mapping. (A creator killed meanwhile runs no code; its
    resource tracker removes the name, see ``shm_segment``.)
    """
    rank = creation.rank
    ring: ShmRing | None = None
    try:
        if rank == members[0]:
            try:
                ring = ShmRing.create(members)
            except OSError as exc:
                creation.put("shm/handle", json.dumps({"error": str(exc)}))
                answer = f"cannot create the segment: {exc}"
            else:
                creation.put("shm/handle", ring.handle.to_json())
                answer = ATTACHED
            creation.arrive("shm/handle")
        elif rank in members:
            creation.await_all("shm/handle", members[:1], "did not publish the group's shared-memory segment")
            published = creation.take("shm/handle")
            if "error" in json.loads(published):
                answer = f"rank {members[0]} could not create the segment"
            else:
                try:
                    ring = ShmRing.attach(ShmHandle.from_json(published), rank)
                    answer = ATTACHED
                except OSError as exc:
                    answer = str(exc)
        if rank in members:
            creation.put(f"shm/{rank}", answer)
            creation.arrive("shm/answers")
        creation.await_all("shm/answers", members, "did not answer the shared-memory handshake")
        answers = {member: creation.take(f"shm/{member}") for member in members}
        failed = {member: answer for member, answer in answers.items() if answer != ATTACHED}
        if ring is not None:
            # Every member has mapped the segment or given up: its name is no longer needed.
            ring.unlink()
            if failed:
                ring.close()
                ring = None
        finish(creation, "shm/done")
    except BaseException:
        if ring is not None:
            # On the creator, close() unlinks first.
            ring.close()
        raise
    return ring, failed


def gloo_store(members: list[int], creation: Creation, ports: range | None) -> object:
    """Open a TCP store used by this gloo group alone; its first member serves it on its own endpoint's host, on a
    port of ``ports`` (any free port when None).

    Paddle 3.3's gloo rendezvous writes unprefixed keys into the store it is given, so groups sharing the
    global store can read each other's addresses. A store per group cannot collide.
    """
    if creation.rank == members[0]:
        host = dist.ParallelEnv().trainer_endpoints[creation.rank].rsplit(":", 1)[0]
        store, port = _serve(host, creation, ports)
        creation.put("gloo/address", f"{host}:{port}")
        creation.arrive("gloo/address")
        return store
    creation.await_all("gloo/address", members[:1], "did not publish the gloo group's own store")
    host, port = creation.take("gloo/address").rsplit(":", 1)
    return _open_without_delay(host, int(port), creation, is_master=False)


PORT_ATTEMPTS = 20
"""How many ports the first member tries for the group's store, each found taken just before the store would bind
it, before it gives up."""


def _serve(host: str, creation: Creation, ports: range | None) -> tuple[object, int]:
    """Start the group's store on a port of ``ports`` that nothing else holds (see ``gloo_ports``); returns the
    store and its port."""
    for _ in range(PORT_ATTEMPTS):
        hold = gloo_ports.hold_port(ports)
        try:
            port = gloo_ports.share_with_store(hold)
            store = _open_without_delay(host, port, creation, is_master=True)
        finally:
            # Paddle's store listens on the port now (or the port was taken): ours need not hold it any longer.
            hold.close()
        if store is not None:
            return store, port
    raise OSError(
        errno.EADDRINUSE,
        f"{PORT_ATTEMPTS} ports in a row were taken by another process just before the gloo group's store could "
        "bind them",
    )


def _open_without_delay(host: str, port: int, creation: Creation, *, is_master: bool) -> object | None:
    # No worker count: the store's own wait for its workers would block; the members' arrival is polled instead.
    timeout_s = max(1, math.ceil(creation.timeout))

    def open_store() -> object | None:
        # Checked on the thread that starts the store, right before: Paddle aborts the process when the port is
        # taken, so a port another process took meanwhile is given up instead.
        if is_master and not gloo_ports.store_can_bind(port):
            return None
        return paddle_internals.open_tcp_store(host, port, is_master=is_master, num_workers=0, timeout_s=timeout_s)

    store = creation.call(
        open_store, f"{'starting' if is_master else 'connecting to'} the gloo group's own store on {host}:{port}"
    )
    if store is not None:
        # new_group's rendezvous makes its requests on this store. A member's client connection exists once the
        # constructor returns; on the first member, connections accepted later take the option from the listener.
        store_without_delay(port)
    return store


GROUP_STORE_ATTRIBUTE = "fastdeploy_patch_rendezvous_store"
"""The attribute of a Paddle gloo group that holds its own rendezvous store, so the store lives as long as it."""


def new_gloo_group(
    members: list[int], creation: Creation, ports: range | None
) -> tuple[dist.communication.group.Group, object]:
    """Collective over the world: the gloo process group over ``members``, made on a rendezvous store of its own.

    Returns the Paddle group and the store (None for a non-member), which must live as long as the group. gloo's
    own rendezvous starts only once every member is connected to the store, and runs until the deadline at most.
    """
    store = None
    if creation.rank in members:
        store = gloo_store(members, creation, ports)
        creation.arrive("gloo/connected")
        creation.await_all("gloo/connected", members, "did not connect to the gloo group's own store")
    with paddle_internals.default_store_lent(store):
        if store is None:
            # A non-member only records the group: nothing to wait for.
            group = dist.new_group(members, backend="gloo")
        else:
            group = creation.call(
                lambda: dist.new_group(members, backend="gloo"), f"gloo's own rendezvous among ranks {members}"
            )
    # Paddle keeps the group in its registry until the process exits, and its gloo context may still reach the
    # store (at exit, say); held by the group's own object, the store is freed only after the process group that
    # refers to it, whoever drops the group last.
    setattr(group, GROUP_STORE_ATTRIBUTE, store)
    finish(creation, "gloo/done")
    return group, store
