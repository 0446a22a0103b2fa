"""The public API: ``new_signal_group`` makes a ``SignalGroup``, ``broadcast_signal`` sends one int32 over it."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import paddle
import paddle.distributed as dist

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import arguments, rendezvous
from fastdeploy_patch.signal_group.arguments import INT32_MAX, INT32_MIN
from fastdeploy_patch.signal_group.creation import RESTART, AgreedRefusal, Creation
from fastdeploy_patch.signal_group.errors import SignalGroupError, unusable_message
from fastdeploy_patch.signal_group.gloo_transport import GLOO_OP_TIMEOUT_S, GlooTransport
from fastdeploy_patch.signal_group.shm_transport import ShmTransport, segment_tag
from fastdeploy_patch.signal_group.store_sockets import store_without_delay

# Creation is collective, so every rank increments this in the same order and derives the same keys.
_created = 0
# (creation number, why) once a creation failed on this rank: every later one is refused.
_failed: tuple[int, str] | None = None
# Whether this process's connection to the global store has had Nagle's delay turned off.
_store_without_delay = False


class SignalGroup:
    """A group of ranks that broadcast one int32 signal per call, over shared memory or gloo.

    Made by ``new_signal_group`` on every rank of the world; on a rank outside ``ranks`` it exists only to keep
    creations in step, and a broadcast on it raises ``ValueError``.
    """

    def __init__(
        self,
        *,
        transport: str,
        ranks: list[int],
        rank: int,
        timeout: float,
        lookahead: int,
        endpoint: GlooTransport | ShmTransport | None,
        paddle_group: dist.communication.group.Group | None = None,
    ) -> None:
        self._transport = transport
        self._ranks = ranks
        self._rank = rank
        self._timeout = timeout
        self._lookahead = lookahead
        self._endpoint = endpoint
        self._paddle_group = paddle_group
        self._broken: str | None = None

    @property
    def transport(self) -> str:
        """``"shm"`` or ``"gloo"``: the same on every rank."""
        return self._transport

    @property
    def ranks(self) -> list[int]:
        """The members' global ranks, sorted."""
        return list(self._ranks)

    @property
    def timeout(self) -> float:
        """Seconds a broadcast waits for a peer before ``TimeoutError``."""
        return self._timeout

    @property
    def lookahead(self) -> int:
        """How many calls later a published value is returned (0: the same call)."""
        return self._lookahead

    @property
    def paddle_group(self) -> dist.communication.group.Group | None:
        """The Paddle gloo group a gloo signal group wraps (registered with Paddle like any group); None for shm."""
        return self._paddle_group

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called on this rank (a group broken by a timeout or a lost peer is not closed:
        it still holds its end until ``close()``)."""
        return self._broken == "it was closed"

    def close(self) -> None:
        """Release this rank's end (unmap the segment, stop a gloo deadline thread). Idempotent; later broadcasts
        raise ``SignalGroupError``. A Paddle gloo group stays registered, with its rendezvous store: Paddle cannot
        remove one."""
        if self._broken != "it was closed":
            self._broken = "it was closed"
            if self._endpoint is not None:
                self._endpoint.close()

    def __enter__(self) -> SignalGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SignalGroup(transport={self._transport!r}, ranks={self._ranks}, timeout={self._timeout:g}, "
            f"lookahead={self._lookahead})"
        )

    def _broadcast(self, value: object, src: int) -> int:
        # The src's way to its publish is as short as it can be: after an idle spell each of its instructions runs
        # from cold caches, and every one before the publish delays the readers' wake. A plain int in range, a
        # member src and a usable group take one test each; anything else goes to the checks that say what is
        # wrong.
        if src not in self._ranks or self._endpoint is None or self._broken is not None:
            self._refuse(src)
        if src != self._rank:
            value = None
        elif type(value) is not int or not INT32_MIN <= value <= INT32_MAX:
            value = arguments.int32(value)
        try:
            return self._endpoint.broadcast(value, src)
        except TimeoutError:
            self._broken = f"a broadcast from src {src} timed out"
            raise
        except SignalGroupError:
            self._broken = f"a broadcast from src {src} lost a peer"
            raise

    def _refuse(self, src: int) -> None:
        """Raise why this rank cannot broadcast from ``src`` on this group: ``ValueError`` for a src or a rank
        outside it, ``SignalGroupError`` once it is closed or broken."""
        if src not in self._ranks:
            raise ValueError(f"src {src} is not a member of the signal group (ranks {self._ranks})")
        if self._endpoint is None:
            raise ValueError(
                f"this process (rank {self._rank}) is not a member of the signal group (ranks {self._ranks})"
            )
        raise SignalGroupError(unusable_message(self._ranks, self._broken))


def new_signal_group(
    ranks: Sequence[int] | None = None,
    *,
    timeout: float | datetime.timedelta = GLOO_OP_TIMEOUT_S,
    transport: str = "auto",
    lookahead: int = 0,
    initial: int = 0,
    create_timeout: float | datetime.timedelta = rendezvous.RENDEZVOUS_TIMEOUT_S,
) -> SignalGroup | None:
    """Create the signal group over ``ranks`` (default: the whole world).

    Collective: every rank of the world calls it, in the same order as its other group creations, once at worker
    start. Returns ``None`` when fewer than 2 ranks take part.

    ``transport``: ``"auto"`` picks shared memory when every member can map the group's segment (all on one host),
    else gloo; ``"shm"`` insists on shared memory and raises ``RuntimeError`` naming the members that cannot map
    it; ``"gloo"`` is the CPU tensor on a gloo group. ``timeout`` bounds every broadcast: up to one day on shared
    memory, at most gloo's fixed 30 s on gloo. With ``lookahead`` d > 0 (shared memory only), call n publishes
    its value and returns call n - d's; the first d calls return ``initial``.

    ``create_timeout`` (seconds or a timedelta, default 300 s) bounds this call on every rank, whatever the others
    do: past it (plus at most 5 s), ``TimeoutError`` names the ranks that never arrived (or did not finish a step)
    and how long this rank waited. A rank whose creation fails tells the others through the global store, and they
    raise ``SignalGroupError`` within a poll (well inside 2 s); so does every rank when the store's host, rank 0,
    exits. After a creation failed on this rank, every later call raises ``SignalGroupError`` at once: the ranks of
    the world are out of step, and only restarting all of them helps. Nothing is left in /dev/shm on any path.
    The port of a gloo group's own store comes from ``FASTDEPLOY_PATCH_GLOO_PORTS`` (``LOW-HIGH``) when set.

    Raises ``TypeError``/``ValueError`` for bad arguments before any communication; ``ValueError`` on every rank
    when ``auto`` falls back to gloo but ``timeout`` or ``lookahead`` needs shared memory (saying why shared memory
    was not possible); ``RuntimeError`` when the distributed environment is not initialised or gloo is needed
    and this Paddle build has none.
    """
    global _created, _failed
    transport = arguments.transport_name(transport)
    seconds = arguments.timeout_seconds(timeout, transport)
    steps = arguments.lookahead_steps(lookahead, transport)
    initial = arguments.int32(initial, "initial")
    create_seconds = arguments.create_timeout_seconds(create_timeout)
    ports = arguments.gloo_ports(os.environ.get(arguments.GLOO_PORTS_ENV))
    members = arguments.member_ranks(ranks, dist.get_world_size())
    if len(members) < 2:
        return None
    if not dist.is_initialized():
        raise RuntimeError(
            "the distributed environment is not initialised: call paddle.distributed.init_parallel_env() in "
            "every rank (started by paddle.distributed.launch or spawn) before new_signal_group()"
        )
    if transport == "gloo":
        _require_gloo()
    else:
        # On every rank, before any communication: only the creator names a segment, and the others would wait for
        # its handle until their timeout.
        segment_tag()
    _created += 1
    creation = Creation(
        _created,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        members=members,
        timeout=create_seconds,
        store=paddle_internals.global_store(),
    )
    if _failed is not None:
        refusal = SignalGroupError(
            f"{creation.describe()} cannot start: creation #{_failed[0]} failed on this rank ({_failed[1]}), so the "
            f"ranks of this world are out of step; {RESTART}"
        )
        # Published for the others, who would otherwise wait for this rank until their deadline.
        with creation:
            raise refusal
    try:
        with creation:
            return _create(creation, members, transport, seconds, steps, initial, ports)
    except AgreedRefusal as agreed:
        raise agreed.error from None
    except BaseException as exc:
        _failed = (creation.number, f"{type(exc).__name__}: {exc}")
        raise


def _create(
    creation: Creation,
    members: list[int],
    transport: str,
    seconds: float,
    steps: int,
    initial: int,
    ports: range | None,
) -> SignalGroup:
    global _store_without_delay
    rank = creation.rank
    if not _store_without_delay:
        _store_without_delay = True
        port = rendezvous.global_store_port()
        if port is not None:
            # Polling the global store takes one request per poll: with Nagle on, each took 44 ms here, 33 us without.
            store_without_delay(port)
    rendezvous.arrive(creation)
    if transport != "gloo":
        ring, failed = rendezvous.negotiate_shm(members, creation)
        if not failed:
            endpoint = (
                ShmTransport(ring, rank, timeout=seconds, lookahead=steps, initial=initial)
                if ring is not None
                else None
            )
            return SignalGroup(
                transport="shm", ranks=members, rank=rank, timeout=seconds, lookahead=steps, endpoint=endpoint
            )
        try:
            _refuse_gloo(members, failed, transport, seconds, steps)
            _require_gloo()
        except (RuntimeError, ValueError) as exc:
            raise AgreedRefusal(exc) from exc
    group, store = rendezvous.new_gloo_group(members, creation, ports)
    endpoint = GlooTransport(group, timeout=seconds, store=store) if store is not None else None
    return SignalGroup(
        transport="gloo", ranks=members, rank=rank, timeout=seconds, lookahead=0, endpoint=endpoint, paddle_group=group
    )


def _require_gloo() -> None:
    if not paddle_internals.has_gloo():
        raise RuntimeError(
            f"this Paddle build ({paddle.__version__}) has no gloo backend, which the gloo signal transport needs: "
            "install a Paddle wheel built with gloo (the official CPU and GPU wheels are)"
        )


def _refuse_gloo(members: list[int], failed: dict[int, str], transport: str, seconds: float, steps: int) -> None:
    """Raise when shared memory failed and gloo cannot stand in (the same on every rank, which all read ``failed``)."""
    why = "; ".join(f"rank {rank}: {reason}" for rank, reason in sorted(failed.items()))
    cannot = (
        f"ranks {sorted(failed)} of the signal group (ranks {members}) cannot map its shared-memory segment ({why})"
    )
    if transport == "shm":
        raise RuntimeError(f"{cannot}; transport='shm' needs every member on one host with a usable /dev/shm")
    if seconds > GLOO_OP_TIMEOUT_S:
        raise ValueError(
            f"{cannot}, so transport='auto' falls back to gloo, whose ops fail after a fixed {GLOO_OP_TIMEOUT_S:g} s: "
            f"timeout {seconds:g} s is too long; pass a timeout <= {GLOO_OP_TIMEOUT_S:g} s or put the ranks on one "
            "host"
        )
    if steps:
        raise ValueError(
            f"{cannot}, so transport='auto' falls back to gloo, which cannot give lookahead {steps}: pass "
            "lookahead=0 or put the ranks on one host"
        )


def broadcast_signal(value: int, src: int = 0, group: SignalGroup | None = None) -> int:
    """Broadcast one int32 from global rank ``src`` over the signal ``group`` and return it on every rank.

    With the group's lookahead d > 0, returns instead the value published d calls earlier (the group's initial
    value for the first d calls). ``value`` is checked on ``src`` (an integer in int32 range) and ignored
    elsewhere; bad input raises ``TypeError``/``ValueError`` before any communication. With ``group=None`` a world
    of one rank gets ``value`` back; a larger world gets ``ValueError``. A stuck peer raises ``TimeoutError``
    within the group's timeout plus about a second; a peer that exited raises ``SignalGroupError``. Either error,
    and ``close()``, leave the group unusable: every later call raises ``SignalGroupError`` at once. Calls on one
    group must not overlap, and every member must make the same calls (``src`` may change from call to call).
    """
    if type(src) is not int:
        src = arguments.src_rank(src)
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
        return arguments.int32(value)
    if not isinstance(group, SignalGroup):
        raise TypeError(
            f"group must be the SignalGroup that new_signal_group() returned, got {group!r} (a Paddle process group "
            "cannot carry the signal: create the signal group once at worker start)"
        )
    return group._broadcast(value, src)
