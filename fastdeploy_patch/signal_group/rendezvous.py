"""How the ranks agree on a new signal group: the shared-memory handshake, and the gloo group's own store.

Both run over Paddle's global TCP store (every rank has it after ``init_parallel_env()``) under keys that are
used once: every rank counts group creations in the same order, so creation number k on one rank is creation k on
all. Every rank of the world takes part, members or not, because ``paddle.distributed.new_group`` must be called
by the whole world whenever gloo is chosen, so every rank must reach the same choice.
"""

from __future__ import annotations

import json
import socket
import time

import paddle.distributed as dist

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group.shm_segment import ShmHandle, ShmRing
from fastdeploy_patch.signal_group.store_sockets import store_without_delay

RENDEZVOUS_TIMEOUT_S = 300
"""How long group creation waits for every member to reach the gloo group's own rendezvous store."""

ATTACHED = "attached"

STORE_POLL_S = 0.001
"""How often the global store's host polls for the ranks still reading the handshake's answers."""

# Paddle's init_parallel_env() makes world rank 0 the host of the global TCP store.
_STORE_HOST_RANK = 0


def key_prefix(creation: int) -> str:
    """The global-store key prefix of this process's ``creation``-th signal group."""
    return f"fastdeploy_patch/signal_group/{creation}"


def _text(raw: object) -> str:
    # The store hands a value back as a list of byte values.
    return bytes(raw).decode()


def negotiate_shm(members: list[int], rank: int, world_size: int, key: str) -> tuple[ShmRing | None, dict[int, str]]:
    """Collective over the world: the first member creates the group's segment, every other member attaches it,
    and each member publishes whether that worked. Every rank reads every member's answer.

    Returns this rank's mapping (None for a non-member, or when any member failed) and ``{rank: reason}`` for the
    members that could not map the segment (empty when every member did). The creator unlinks the segment once
    every member has answered, whatever the outcome, and on every way out of this function, exceptions included (a
    store timeout, a connection reset by a peer that died, an interrupt): nothing is left in /dev/shm after this
    returns or raises, and a member that raises keeps no mapping. (A creator killed meanwhile runs no code; its
    resource tracker removes the name, see ``shm_transport``.) The rank that hosts the global store returns only
    after every rank has read its answers: were it to exit at once (a crash at the first step), the others' reads
    would fail with a reset connection.
    """
    store = paddle_internals.global_store()
    ring: ShmRing | None = None
    try:
        if rank == members[0]:
            try:
                ring = ShmRing.create(members)
            except OSError as exc:
                store.set(f"{key}/shm/handle", json.dumps({"error": str(exc)}))
                store.set(f"{key}/shm/{rank}", f"cannot create the segment: {exc}")
            else:
                store.set(f"{key}/shm/handle", ring.handle.to_json())
                store.set(f"{key}/shm/{rank}", ATTACHED)
        elif rank in members:
            published = _text(store.get(f"{key}/shm/handle"))
            if "error" in json.loads(published):
                answer = f"rank {members[0]} could not create the segment"
            else:
                try:
                    ring = ShmRing.attach(ShmHandle.from_json(published), rank)
                    answer = ATTACHED
                except OSError as exc:
                    answer = str(exc)
            store.set(f"{key}/shm/{rank}", answer)
        answers = {member: _text(store.get(f"{key}/shm/{member}")) for member in members}
        failed = {member: answer for member, answer in answers.items() if answer != ATTACHED}
        if ring is not None:
            # Every member has mapped the segment or given up: its name is no longer needed.
            ring.unlink()
            if failed:
                ring.close()
                ring = None
        _all_read(store, f"{key}/shm/read", rank, world_size)
    except BaseException:
        if ring is not None:
            # On the creator, close() unlinks first.
            ring.close()
        raise
    return ring, failed


def _all_read(store: object, key: str, rank: int, world_size: int) -> None:
    read = store.add(key, 1)
    if rank != _STORE_HOST_RANK:
        return
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while read < world_size:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {read} of {world_size} ranks finished creating a signal group within {RENDEZVOUS_TIMEOUT_S} s: "
                "every rank of the world must call new_signal_group(), in the same order"
            )
        time.sleep(STORE_POLL_S)
        read = store.add(key, 0)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def gloo_store(members: list[int], rank: int, key: str) -> object:
    """Open a TCP store used by this gloo group alone; its first member serves it on its own endpoint's host.

    Paddle 3.3's gloo rendezvous writes unprefixed keys into the store it is given, so groups sharing the
    global store can read each other's addresses. A store per group cannot collide.
    """
    store = paddle_internals.global_store()
    if rank == members[0]:
        host = dist.ParallelEnv().trainer_endpoints[rank].rsplit(":", 1)[0]
        port = _free_port(host)
        store.set(key, f"{host}:{port}")
        return _open_without_delay(host, port, is_master=True, num_workers=len(members))
    host, port = _text(store.get(key)).rsplit(":", 1)
    return _open_without_delay(host, int(port), is_master=False, num_workers=len(members))


def _open_without_delay(host: str, port: int, *, is_master: bool, num_workers: int) -> object:
    store = paddle_internals.open_tcp_store(
        host, port, is_master=is_master, num_workers=num_workers, timeout_s=RENDEZVOUS_TIMEOUT_S
    )
    # new_group's rendezvous makes its requests on this store. A member's client connection exists once the
    # constructor returns; on the first member, connections accepted later take the option from the listener.
    store_without_delay(port)
    return store


GROUP_STORE_ATTRIBUTE = "fastdeploy_patch_rendezvous_store"
"""The attribute of a Paddle gloo group that holds its own rendezvous store, so the store lives as long as it."""


def new_gloo_group(members: list[int], rank: int, key: str) -> tuple[dist.communication.group.Group, object]:
    """Collective over the world: the gloo process group over ``members``, made on a rendezvous store of its own.

    Returns the Paddle group and the store (None for a non-member), which must live as long as the group.
    """
    store = gloo_store(members, rank, key) if rank in members else None
    with paddle_internals.default_store_lent(store):
        group = dist.new_group(members, backend="gloo")
    # Paddle keeps the group in its registry until the process exits, and its gloo context may still reach the
    # store (at exit, say); held by the group's own object, the store is freed only after the process group that
    # refers to it, whoever drops the group last.
    setattr(group, GROUP_STORE_ATTRIBUTE, store)
    return group, store
