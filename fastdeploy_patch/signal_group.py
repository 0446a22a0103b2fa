"""The CPU (gloo) signal group and the per-step broadcast of one int32 over it.

The model-weights status is 4 bytes. Broadcasting it over the default group costs a device kernel and a
device-to-host copy every step when that group is NCCL; over a gloo group it is a CPU tensor on a TCP pair,
with nothing queued behind GPU work.
"""

from __future__ import annotations

import datetime
import numbers
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.base import core
from paddle.distributed import collective

from fastdeploy_patch.paddle_internals import paddle_private

GLOO_OP_TIMEOUT_S = 30.0
"""Paddle 3.3 builds every gloo process group with this fixed op timeout and ignores ``new_group(timeout=...)``."""

RENDEZVOUS_TIMEOUT_S = 300
"""How long group creation waits for every member to reach the rendezvous."""

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

# A gloo error that arrives this close to gloo's own limit is that limit firing, not a peer going away.
_GLOO_LIMIT_SLACK_S = 1.0


class SignalGroupError(RuntimeError):
    """A signal broadcast failed because a peer exited or dropped its connection, or the group is unusable."""


@dataclass
class _DeadlineCaller:
    """Runs calls on a daemon thread so that the caller can give up after a deadline.

    A call stuck inside gloo cannot be interrupted; a daemon thread lets the caller stop waiting and the
    process still exit.
    """

    name: str
    _requests: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None

    def call(self, fn: Callable[[], object], timeout: float) -> bool:
        """Run ``fn`` and wait at most ``timeout`` seconds. Re-raises what ``fn`` raised; False on timeout."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        done = threading.Event()
        outcome: list[BaseException] = []
        self._requests.put((fn, done, outcome))
        if not done.wait(timeout):
            return False
        if outcome:
            raise outcome[0]
        return True

    def _serve(self) -> None:
        while True:
            fn, done, outcome = self._requests.get()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the waiting caller
                outcome.append(exc)
            done.set()


@dataclass
class _SignalGroupState:
    ranks: list[int]
    timeout: float
    # The group's own rendezvous store; kept alive for as long as the group is.
    store: object
    caller: _DeadlineCaller | None
    # One CPU int32 reused by every broadcast: gloo sets up its transfer buffers per tensor address, so a fresh
    # tensor each step roughly doubled the step time here (about 240 against 130 us at 2 ranks).
    buffer: paddle.Tensor
    broken: str | None = None


_SIGNAL_GROUPS: dict[str, _SignalGroupState] = {}
# Creation is collective, so every rank increments this in the same order and derives the same key.
_created = 0


def _timeout_seconds(timeout: float | datetime.timedelta) -> float:
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds (int or float) or a datetime.timedelta, got {timeout!r}")
    if not 0 < seconds <= GLOO_OP_TIMEOUT_S:
        raise ValueError(
            f"timeout must be > 0 and <= {GLOO_OP_TIMEOUT_S:g} s, got {timeout!r}: Paddle's gloo backend fails "
            f"every op after a fixed {GLOO_OP_TIMEOUT_S:g} s, so a longer timeout cannot be honoured"
        )
    return seconds


def _member_ranks(ranks: Sequence[int] | None, world_size: int) -> list[int]:
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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _rendezvous_store(members: list[int], rank: int, key: str) -> object:
    """Open a TCP store used by this group alone; its first member serves it.

    Paddle 3.3's gloo rendezvous writes unprefixed keys into the store it is given, so groups sharing the
    global store can read each other's addresses. A store per group cannot collide.
    """
    global_store = core.create_or_get_global_tcp_store()
    if rank == members[0]:
        host = dist.ParallelEnv().trainer_endpoints[rank].rsplit(":", 1)[0]
        port = _free_port(host)
        global_store.set(key, f"{host}:{port}")
        return core.TCPStore(host, port, True, len(members), RENDEZVOUS_TIMEOUT_S)
    host, port = bytes(global_store.get(key)).decode().rsplit(":", 1)
    return core.TCPStore(host, int(port), False, len(members), RENDEZVOUS_TIMEOUT_S)


def new_signal_group(
    ranks: Sequence[int] | None = None, *, timeout: float | datetime.timedelta = GLOO_OP_TIMEOUT_S
) -> dist.communication.group.Group | None:
    """Create the CPU signal group: a gloo-backed Paddle group over ``ranks`` (default: the whole world).

    Collective: every rank of the world calls it, in the same order as its other group creations, once at
    worker start. Returns ``None`` when fewer than 2 ranks take part. Broadcasts on the returned group raise
    ``TimeoutError`` after ``timeout`` seconds (at most gloo's fixed 30 s). The group has a rendezvous store of
    its own, so creating it is reliable at any rank count and beside other gloo groups.

    Raises ``TypeError``/``ValueError`` for bad arguments, and ``RuntimeError`` when the distributed
    environment is not initialised or this Paddle build has no gloo.
    """
    global _created
    seconds = _timeout_seconds(timeout)
    members = _member_ranks(ranks, dist.get_world_size())
    if len(members) < 2:
        return None
    if not dist.is_initialized():
        raise RuntimeError(
            "the distributed environment is not initialised: call paddle.distributed.init_parallel_env() in "
            "every rank (started by paddle.distributed.launch or spawn) before new_signal_group()"
        )
    if not hasattr(core, "ProcessGroupGloo"):
        raise RuntimeError(
            f"this Paddle build ({paddle.__version__}) has no gloo backend, which the CPU signal group needs: "
            "install a Paddle wheel built with gloo (the official CPU and GPU wheels are)"
        )
    _created += 1
    rank = dist.get_rank()
    store = None
    if rank in members:
        store = _rendezvous_store(members, rank, f"fastdeploy_patch/signal_group/{_created}")
    set_default_store = paddle_private(collective, "_set_default_store")
    # new_group() has no store argument: it always uses the default store, so lend it ours for this call.
    set_default_store(store)
    try:
        group = dist.new_group(members, backend="gloo")
    finally:
        set_default_store(core.create_or_get_global_tcp_store())
    # Pay for a deadline thread only when the caller wants less than gloo's own limit.
    caller = _DeadlineCaller(f"signal-{group.name}") if seconds < GLOO_OP_TIMEOUT_S else None
    buffer = paddle.full([1], 0, dtype="int32", device="cpu")
    _SIGNAL_GROUPS[group.name] = _SignalGroupState(members, seconds, store, caller, buffer)
    return group


def _int32(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"signal value must be an integer (int or numpy integer), got {value!r}")
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"signal value {value!r} is outside int32 range [{INT32_MIN}, {INT32_MAX}]")
    return int(value)


def broadcast_signal(value: int, src: int = 0, group: dist.communication.group.Group | None = None) -> int:
    """Broadcast one int32 from global rank ``src`` over the signal ``group`` and return it on every rank.

    The value travels as a CPU tensor: no device tensor, kernel or device-host copy. ``value`` is checked on
    ``src`` (an integer in int32 range) and ignored elsewhere; bad input raises ``TypeError``/``ValueError``
    before any communication. With ``group=None`` a world of one rank gets ``value`` back; a larger world gets
    ``ValueError``. A stuck peer raises ``TimeoutError`` within the group's timeout plus about a second; a peer
    that exited raises ``SignalGroupError``. Either error leaves the group unusable. Calls on one group must not
    overlap (they are collectives, and they share the group's one buffer).
    """
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)):
        raise TypeError(f"src must be an integer global rank, got {src!r}")
    if group is None:
        world_size = dist.get_world_size()
        if world_size > 1:
            raise ValueError(
                f"broadcast_signal() needs the signal group in a world of {world_size} ranks: create it once "
                "with new_signal_group() at worker start and pass it as group= (the default group may be NCCL, "
                "which cannot carry a CPU tensor)"
            )
        if src != 0:
            raise ValueError(f"src {src} is not a rank of a single-rank world")
        return _int32(value)
    state = _SIGNAL_GROUPS.get(getattr(group, "name", None))
    if state is None:
        raise ValueError(f"group {group!r} was not created by new_signal_group()")
    if src not in state.ranks:
        raise ValueError(f"src {src} is not a member of the signal group (ranks {state.ranks})")
    rank = dist.get_rank()
    if rank not in state.ranks:
        raise ValueError(f"this process (rank {rank}) is not a member of the signal group (ranks {state.ranks})")
    if state.broken is not None:
        raise SignalGroupError(f"the signal group (ranks {state.ranks}) is unusable: {state.broken}")
    tensor = state.buffer
    if rank == src:
        tensor.fill_(_int32(value))
    # The process group's own broadcast: dist.broadcast would repeat, every step, membership checks done above.
    # Paddle's gloo runs the broadcast inside the call, so the returned task has nothing left to wait for.
    process_group, src_in_group = group.process_group, state.ranks.index(src)
    _run_broadcast(state, lambda: process_group.broadcast(tensor, src_in_group, True), src)
    return int(tensor.item())


def _run_broadcast(state: _SignalGroupState, send: Callable[[], object], src: int) -> None:
    started = time.monotonic()
    try:
        if state.caller is None:
            finished = True
            send()
        else:
            finished = state.caller.call(send, state.timeout)
    except RuntimeError as exc:
        waited = time.monotonic() - started
        if waited >= GLOO_OP_TIMEOUT_S - _GLOO_LIMIT_SLACK_S:
            state.broken = f"a broadcast from src {src} timed out"
            raise TimeoutError(_timeout_message(state, src, waited)) from exc
        state.broken = f"a broadcast from src {src} lost a peer"
        raise SignalGroupError(
            f"signal broadcast from src {src} on the signal group (ranks {state.ranks}) failed after "
            f"{waited:.2f} s: a peer exited or dropped its connection ({exc})"
        ) from exc
    if not finished:
        state.broken = f"a broadcast from src {src} timed out"
        raise TimeoutError(_timeout_message(state, src, time.monotonic() - started))


def _timeout_message(state: _SignalGroupState, src: int, waited: float) -> str:
    return (
        f"signal broadcast from src {src} on the signal group (ranks {state.ranks}) got no answer after "
        f"{waited:.1f} s (timeout {state.timeout:g} s): a peer is stuck and is not taking part"
    )
