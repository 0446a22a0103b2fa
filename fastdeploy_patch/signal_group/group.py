"""The public API: ``new_signal_group`` makes a ``SignalGroup``, ``broadcast_signal`` sends one int32 over it."""

from __future__ import annotations

import datetime
import os
import weakref
from collections.abc import Sequence

import paddle
import paddle.distributed as dist

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import arguments, rendezvous
from fastdeploy_patch.signal_group.arguments import INT32_MAX, INT32_MIN
from fastdeploy_patch.signal_group.creation import RESTART, AgreedRefusal, Creation
from fastdeploy_patch.signal_group.errors import (
    MAKE_A_NEW_GROUP,
    RESTART_THE_WORLD,
    SignalGroupError,
    unusable_message,
)
from fastdeploy_patch.signal_group.gloo_transport import GLOO_OP_TIMEOUT_S, GlooTransport
from fastdeploy_patch.signal_group.shm_segment import segment_tag
from fastdeploy_patch.signal_group.shm_transport import ShmTransport
from fastdeploy_patch.signal_group.store_sockets import store_without_delay

# Creation is collective, so every rank increments this in the same order and derives the same keys.
_created = 0
# (creation number, why) once a creation failed on this rank: every later one is refused.
_failed: tuple[int, str] | None = None
# Whether this process's connection to the global store has had Nagle's delay turned off.
_store_without_delay = False

# A group's state between calls is None (ready: the only state the fast path lets through), one of these two
# markers, or the reason it is unusable (a str, which says what happened).
_CALLING = "a call is running"
"""A call is running on this group: a second one (another thread, or a signal handler of the calling thread)
must not start."""
_INTERRUPTED = "a call ended early"
"""The last call raised before it finished: the next call finishes it."""
_CLOSED = "it was closed"
_FORKED = "this process was forked from the one that created it"

# Every group with an end of its own in this process: a forked child marks them all before it runs any code of its
# own, so that no call of the child gets past the fast path's one test of the state.
_live_groups: weakref.WeakSet[SignalGroup] = weakref.WeakSet()


def _mark_forked() -> None:
    for group in list(_live_groups):
        group._state = _FORKED


os.register_at_fork(after_in_child=_mark_forked)


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
        timeout: float | None,
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
        self._state: str | None = None
        # Calls finished on this rank: call n is the (n + 1)-th, the same on every member.
        self._calls = 0
        # The src of the call that ended early (meaningful in state _INTERRUPTED only).
        self._interrupted_src = 0
        if endpoint is not None:
            _live_groups.add(self)

    @property
    def transport(self) -> str:
        """``"shm"`` or ``"gloo"``: the same on every rank."""
        return self._transport

    @property
    def ranks(self) -> list[int]:
        """The members' global ranks, sorted."""
        return list(self._ranks)

    @property
    def timeout(self) -> float | None:
        """Seconds a broadcast waits for a peer before ``TimeoutError``; None: no bound of the group's own (shared
        memory waits while every peer is alive, gloo fails after its fixed 30 s)."""
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
        """Whether ``close()`` was called on this rank (a group that lost a peer is not closed: it still holds its end
        until ``close()``)."""
        return self._state == _CLOSED

    def close(self) -> None:
        """Release this rank's end (unmap the segment, stop a gloo deadline thread). Idempotent; later broadcasts
        raise ``SignalGroupError``. A Paddle gloo group stays registered, with its rendezvous store: Paddle cannot
        remove one. In a forked child it only marks the group closed: the ends belong to the parent."""
        if self._state != _CLOSED:
            forked, self._state = self._state == _FORKED, _CLOSED
            if self._endpoint is not None and not forked:
                self._endpoint.close()

    def __enter__(self) -> SignalGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SignalGroup(transport={self._transport!r}, ranks={self._ranks}, timeout={self._timeout}, "
            f"lookahead={self._lookahead})"
        )

    def _broadcast(self, value: object, src: int) -> int:
        # The src's way to its publish is as short as it can be: after an idle spell each of its instructions runs
        # from cold caches, and every one before the publish delays the readers' wake. A plain int in range, a
        # member src and a ready group take one test each; anything else goes to ``_other_call``, which finishes an
        # interrupted call or says what is wrong.
        if src not in self._ranks or self._endpoint is None or self._state is not None:
            return self._other_call(value, src)
        if src != self._rank:
            value = None
        elif type(value) is not int or not INT32_MIN <= value <= INT32_MAX:
            value = arguments.int32(value)
        n = self._calls
        # Every state store below is a plain store with no call before it in its statement: CPython runs signal
        # handlers (and switches threads) only at calls and backward jumps, so none can land between the test of
        # the state above and its store here, nor between the end of the call and its commit. The commit is one
        # statement: the call counts as made exactly when the state is ready again.
        try:
            self._state = _CALLING
            value = self._endpoint.broadcast(value, src, n)
            self._state, self._calls = None, n + 1
        except BaseException as exc:
            # Plain stores first: a call here could let a second signal in before the state leaves _CALLING.
            self._interrupted_src, self._state = src, _INTERRUPTED
            self._ended_early(exc, src)
            raise
        return value

    def _other_call(self, value: object, src: int) -> int:
        """A call that the fast path does not take: finish the call that ended early (the same src, else
        ``ValueError``), or raise why this rank cannot broadcast from ``src`` on this group: ``ValueError`` for a src
        or a rank outside it, ``RuntimeError`` while another call runs, ``SignalGroupError`` once it is closed,
        broken, or used from a forked child."""
        if src not in self._ranks:
            raise ValueError(f"src {src} is not a member of the signal group (ranks {self._ranks})")
        if self._endpoint is None:
            raise ValueError(
                f"this process (rank {self._rank}) is not a member of the signal group (ranks {self._ranks})"
            )
        state = self._state
        if state is _CALLING:
            raise RuntimeError(
                f"a broadcast on the signal group (ranks {self._ranks}) is already running in this process (another "
                "thread, or a signal handler that interrupted it): calls on one group must not overlap"
            )
        if state == _FORKED:
            raise SignalGroupError(
                f"the signal group (ranks {self._ranks}) was created by process {os.getppid()}, not by this one "
                f"({os.getpid()}): a forked child must not call broadcast_signal() on its parent's group (it would "
                "take the parent's values); only the process that created a group may use it"
            )
        if state is not _INTERRUPTED:
            advice = MAKE_A_NEW_GROUP if state == _CLOSED else RESTART_THE_WORLD
            raise SignalGroupError(unusable_message(self._ranks, state, advice))
        if src != self._interrupted_src:
            raise ValueError(
                f"src {src} is not the src of the call that ended early on this rank (src {self._interrupted_src}): "
                f"call broadcast_signal() with src {self._interrupted_src} to finish it; every member makes the same "
                "calls"
            )
        value = arguments.int32(value) if src == self._rank else None
        n = self._calls
        try:
            self._state = _CALLING
            value = self._endpoint.resume(value, src, n)
            self._state, self._calls = None, n + 1
        except BaseException as exc:
            # Plain stores first: a call here could let a second signal in before the state leaves _CALLING.
            self._interrupted_src, self._state = src, _INTERRUPTED
            self._ended_early(exc, src)
            raise
        return value

    def _ended_early(self, exc: BaseException, src: int) -> None:
        """After the call from ``src`` raised ``exc`` (the state already says it ended early, so the next call
        finishes it): mark the group unusable when the transport says it cannot go on (a lost peer, a gloo op that
        may or may not have run)."""
        broken = self._endpoint.broken_by(exc, src)
        if broken is not None:
            self._state = broken


def new_signal_group(
    ranks: Sequence[int] | None = None,
    *,
    timeout: float | datetime.timedelta | None = None,
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
    memory, at most gloo's fixed 30 s on gloo. ``None`` (the default): on shared memory a broadcast waits as long as
    every peer it waits for is alive, with a warning on the ``fastdeploy_patch`` logger after 30 s and every 60 s
    after that (300 s per call for a peer whose liveness cannot be judged from here); on gloo, gloo's own 30 s.
    With ``lookahead`` d > 0 (shared memory only), call n publishes
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


def _refuse_gloo(
    members: list[int], failed: dict[int, str], transport: str, seconds: float | None, steps: int
) -> None:
    """Raise when shared memory failed and gloo cannot stand in (the same on every rank, which all read ``failed``)."""
    why = "; ".join(f"rank {rank}: {reason}" for rank, reason in sorted(failed.items()))
    cannot = (
        f"ranks {sorted(failed)} of the signal group (ranks {members}) cannot map its shared-memory segment ({why})"
    )
    if transport == "shm":
        raise RuntimeError(f"{cannot}; transport='shm' needs every member on one host with a usable /dev/shm")
    if seconds is not None and seconds > GLOO_OP_TIMEOUT_S:
        raise ValueError(
            f"{cannot}, so transport='auto' falls back to gloo, whose ops fail after a fixed {GLOO_OP_TIMEOUT_S:g} s: "
            f"timeout {seconds:g} s is too long; pass a timeout <= {GLOO_OP_TIMEOUT_S:g} s, or None, or put the ranks "
            "on one host"
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
    of one rank gets ``value`` back; a larger world gets ``ValueError``. A slow peer raises ``TimeoutError``
    after the group's timeout (see ``new_signal_group``); a peer that exited raises ``SignalGroupError``.

    A call that raised anything but ``SignalGroupError`` (its ``TimeoutError``, ``KeyboardInterrupt``, an exception
    from a signal handler) is finished by the next call on this rank, which must have the same ``src``
    (``ValueError`` otherwise) and returns the value the interrupted call waited for; on the src, a value already
    published stays (the retry's ``value`` is then ignored). On gloo, a call interrupted while gloo itself ran
    cannot be finished: every later call raises ``SignalGroupError``. A lost peer and ``close()`` leave the group
    unusable: every later call raises ``SignalGroupError`` at once. Only the process that created the group may
    call it (a forked child gets ``SignalGroupError`` and touches nothing), one call at a time (a second thread
    gets ``RuntimeError``); every member must make the same calls (``src`` may change from call to call).
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
