"""new_signal_group / broadcast_signal / SignalGroup: the argument checks, the transport decision, and the gloo
transport with Paddle's collectives, stores and group registry faked (shared memory is real here)."""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import paddle
import pytest
from paddle.distributed import collective
from paddle.distributed.communication.group import Group

import fastdeploy_patch
from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import (
    GLOO_OP_TIMEOUT_S,
    RENDEZVOUS_TIMEOUT_S,
    SignalGroup,
    SignalGroupError,
    broadcast_signal,
    gloo_transport,
    new_signal_group,
    rendezvous,
)
from fastdeploy_patch.signal_group import group as api
from fastdeploy_patch.signal_group.gloo_transport import GlooTransport, _DeadlineCaller
from fastdeploy_patch.signal_group.rendezvous import GROUP_STORE_ATTRIBUTE
from fastdeploy_patch.signal_group.shm_transport import ShmTransport
from fastdeploy_patch.status import ModelWeightsStatus

from .conftest import FakeGlobalStore, FakeTCPStore, GlooLikePG
from .shm_calls import Injected, source_line, traced

FREE_PORT = 41234


def test_the_package_exports_the_public_api() -> None:
    assert fastdeploy_patch.SignalGroup is SignalGroup
    assert fastdeploy_patch.new_signal_group is new_signal_group
    assert fastdeploy_patch.broadcast_signal is broadcast_signal
    assert fastdeploy_patch.SignalGroupError is SignalGroupError
    assert issubclass(SignalGroupError, RuntimeError)


@dataclass
class FakeWorld:
    """What one rank sees of Paddle's distributed environment; tests change it before acting."""

    rank: int = 0
    world_size: int = 2
    initialized: bool = True
    gloo: bool = True
    endpoints: list[str] = field(default_factory=lambda: [f"127.0.0.{i + 1}:6170" for i in range(8)])
    global_store: FakeGlobalStore = field(default_factory=FakeGlobalStore)
    # Every store handed to collective._set_default_store, in order.
    default_stores: list[object] = field(default_factory=list)
    # (ranks, backend, default store while new_group ran) per new_group call.
    new_group_calls: list[tuple[list[int], str, object]] = field(default_factory=list)
    new_group_error: BaseException | None = None
    # Every rendezvous store opened, in order.
    opened_stores: list[object] = field(default_factory=list)
    # (port, stores opened by then) per store_without_delay call: it must come after the store it speeds up.
    nodelay_ports: list[tuple[int, int]] = field(default_factory=list)
    # Every port hold made for a gloo group's store, in order.
    holds: list[FakeHold] = field(default_factory=list)

    def new_group(self, ranks: list[int], backend: str) -> Group:
        self.new_group_calls.append((list(ranks), backend, self.default_stores[-1]))
        if self.new_group_error is not None:
            raise self.new_group_error
        gid = len(self.new_group_calls)
        member = self.rank in ranks
        return Group(
            ranks.index(self.rank) if member else -1,
            gid,
            sorted(ranks),
            pg=GlooLikePG() if member else None,
            name=f"_default_pg{gid}",
        )

    def answer(self, creation: int, rank: int, answer: str = rendezvous.ATTACHED) -> None:
        """What member ``rank`` would have published about the segment of creation number ``creation``."""
        self.global_store.values[f"fastdeploy_patch/signal_group/{creation}/shm/{rank}"] = answer.encode()


class FakeHold:
    """The socket ``gloo_ports.hold_port`` returns: bound to ``FREE_PORT``; records whether it was shared with the
    store and closed."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []
        self.closed = False

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", FREE_PORT)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def world() -> Iterator[FakeWorld]:
    with fake_world() as fake:
        yield fake


@contextlib.contextmanager
def fake_world() -> Iterator[FakeWorld]:
    """Paddle's distributed environment faked for one rank (see ``FakeWorld``)."""
    fake = FakeWorld()
    dist = api.dist
    with (
        mock.patch.object(paddle_internals, "global_store", side_effect=lambda: fake.global_store),
        mock.patch.object(paddle_internals, "has_gloo", side_effect=lambda: fake.gloo),
        mock.patch.object(
            paddle_internals,
            "open_tcp_store",
            side_effect=lambda host, port, *, is_master, num_workers, timeout_s: (
                fake.opened_stores.append(FakeTCPStore(host, port, is_master, num_workers, timeout_s))
                or fake.opened_stores[-1]
            ),
        ),
        mock.patch.object(
            rendezvous.gloo_ports,
            "hold_port",
            side_effect=lambda ports: fake.holds.append(FakeHold()) or fake.holds[-1],
        ) as free_port,
        mock.patch.object(rendezvous.gloo_ports, "store_can_bind", return_value=True),
        mock.patch.object(
            rendezvous,
            "store_without_delay",
            side_effect=lambda port: fake.nodelay_ports.append((port, len(fake.opened_stores))),
        ),
        mock.patch.object(dist, "get_world_size", side_effect=lambda: fake.world_size),
        mock.patch.object(dist, "get_rank", side_effect=lambda: fake.rank),
        mock.patch.object(dist, "is_initialized", side_effect=lambda: fake.initialized),
        mock.patch.object(dist, "ParallelEnv", side_effect=lambda: mock.Mock(trainer_endpoints=fake.endpoints)),
        mock.patch.object(dist, "new_group", side_effect=fake.new_group) as new_group,
        mock.patch.object(collective, "_set_default_store", side_effect=fake.default_stores.append),
    ):
        fake.free_port = free_port
        fake.new_group_mock = new_group
        yield fake


def _no_communication(world: FakeWorld) -> None:
    assert world.new_group_calls == []
    assert world.global_store.sets == [] and world.global_store.gets == [] and world.global_store.adds == []
    assert api._created == 0


# --- the gloo group's rendezvous --------------------------------------------------------------------------


def test_first_member_publishes_its_own_store_and_lends_it_to_new_group(world: FakeWorld) -> None:
    world.world_size = 3
    group = new_signal_group(transport="gloo")

    assert world.global_store.sets == [("fastdeploy_patch/signal_group/1/gloo/address", f"127.0.0.1:{FREE_PORT}")]
    # Any free port (no FASTDEPLOY_PATCH_GLOO_PORTS), held until Paddle's store had bound it, then shared with it.
    world.free_port.assert_called_once_with(None)
    (hold,) = world.holds
    assert hold.options == [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)] and hold.closed
    # No worker count: the store's own wait for its workers has no deadline of ours.
    own_store = FakeTCPStore("127.0.0.1", FREE_PORT, True, 0, RENDEZVOUS_TIMEOUT_S)
    assert world.new_group_calls == [([0, 1, 2], "gloo", own_store)]
    # Nagle off on the group's own store, whose port the global store's never is.
    assert world.nodelay_ports == [(FREE_PORT, 1)]
    # Lent for the new_group call only: the global store is the default again afterwards.
    assert world.default_stores == [own_store, world.global_store]
    assert isinstance(group, SignalGroup)
    assert (group.transport, group.ranks, group.timeout, group.lookahead) == ("gloo", [0, 1, 2], None, 0)
    assert group.paddle_group.name == "_default_pg1"
    assert group._endpoint._store == own_store and group._endpoint._caller is None
    assert getattr(group.paddle_group, GROUP_STORE_ATTRIBUTE) is group._endpoint._store


def test_other_members_connect_to_the_published_store(world: FakeWorld) -> None:
    world.world_size, world.rank = 4, 2
    world.global_store.values["fastdeploy_patch/signal_group/1/gloo/address"] = b"10.0.0.5:4567"
    group = new_signal_group(transport="gloo", create_timeout=2.5)

    assert world.global_store.sets == []
    assert world.global_store.gets == ["fastdeploy_patch/signal_group/1/gloo/address"]
    world.free_port.assert_not_called()
    # The store's own timeout is whole seconds: the creation's, rounded up.
    their_store = FakeTCPStore("10.0.0.5", 4567, False, 0, 3)
    assert world.new_group_calls == [([0, 1, 2, 3], "gloo", their_store)]
    assert world.nodelay_ports == [(4567, 1)]
    assert world.default_stores == [their_store, world.global_store]
    assert group._endpoint._store == their_store
    assert getattr(group.paddle_group, GROUP_STORE_ATTRIBUTE) is group._endpoint._store


def test_the_first_listed_member_serves_on_its_own_endpoint_host(world: FakeWorld) -> None:
    world.world_size, world.rank = 4, 1
    world.endpoints = ["10.1.0.1:6170", "10.1.0.2:6170", "10.1.0.3:6170", "10.1.0.4:6170"]
    group = new_signal_group([3, 1], transport="gloo")

    assert world.global_store.sets == [("fastdeploy_patch/signal_group/1/gloo/address", f"10.1.0.2:{FREE_PORT}")]
    assert world.new_group_calls[0][:2] == ([1, 3], "gloo")
    assert world.new_group_calls[0][2] == FakeTCPStore("10.1.0.2", FREE_PORT, True, 0, RENDEZVOUS_TIMEOUT_S)
    assert group.ranks == [1, 3]


def test_every_group_gets_a_key_of_its_own_also_when_this_rank_is_not_a_member(world: FakeWorld) -> None:
    world.world_size = 3
    outside = new_signal_group([1, 2], transport="gloo")
    first = new_signal_group(transport="gloo")
    second = new_signal_group([0, 2], transport="gloo")

    # A non-member opens no store, but counts the creation so that every rank derives the same next key.
    assert world.new_group_calls[0] == ([1, 2], "gloo", None)
    assert world.default_stores[:2] == [None, world.global_store]
    assert [key for key, _ in world.global_store.sets] == [
        "fastdeploy_patch/signal_group/2/gloo/address",
        "fastdeploy_patch/signal_group/3/gloo/address",
    ]
    assert [world.new_group_calls[i][0] for i in (1, 2)] == [[0, 1, 2], [0, 2]]
    assert len({g.paddle_group.name for g in (outside, first, second)}) == 3
    assert outside._endpoint is None and outside.transport == "gloo"


def test_the_global_store_is_restored_when_new_group_raises(world: FakeWorld) -> None:
    world.new_group_error = RuntimeError("connectFullMesh failed")
    with pytest.raises(RuntimeError, match="connectFullMesh failed"):
        new_signal_group(transport="gloo")

    own_store = FakeTCPStore("127.0.0.1", FREE_PORT, True, 0, RENDEZVOUS_TIMEOUT_S)
    assert world.default_stores == [own_store, world.global_store]


def test_a_fresh_process_imports_the_rendezvous_without_joining_a_world() -> None:
    # Importing it starts no store and initialises no parallel env: a rank does both only when asked to.
    probe = "import fastdeploy_patch.signal_group.rendezvous as r, paddle.distributed as d; "
    probe += "print(callable(r.gloo_store), d.is_initialized())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, "True False\n"), done.stderr


# --- argument checks, all before any communication ------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "seconds"), [(5, 5.0), (0.25, 0.25), (datetime.timedelta(seconds=12), 12.0), (np.float32(2.5), 2.5)]
)
def test_a_gloo_timeout_below_gloos_limit_gets_a_deadline_thread(
    world: FakeWorld, timeout: object, seconds: float
) -> None:
    group = new_signal_group(timeout=timeout, transport="gloo")
    assert group.timeout == seconds
    caller = group._endpoint._caller
    assert isinstance(caller, _DeadlineCaller)
    assert caller.name == f"signal-{group.paddle_group.name}"


@pytest.mark.parametrize("timeout", [GLOO_OP_TIMEOUT_S, 30, datetime.timedelta(seconds=30)])
def test_a_gloo_timeout_at_gloos_limit_costs_no_thread(world: FakeWorld, timeout: object) -> None:
    group = new_signal_group(timeout=timeout, transport="gloo")
    assert (group.timeout, group._endpoint._caller) == (30.0, None)


@pytest.mark.parametrize("timeout", [30.001, 31, datetime.timedelta(minutes=1), 86_400])
def test_a_gloo_timeout_above_gloos_limit_is_refused(world: FakeWorld, timeout: object) -> None:
    with pytest.raises(ValueError) as err:
        new_signal_group(timeout=timeout, transport="gloo")
    assert str(err.value) == (
        f"timeout must be <= 30 s with transport='gloo', got {timeout!r}: Paddle's gloo backend fails every op "
        "after a fixed 30 s; use transport='shm' (ranks on one host) for a longer one, or timeout=None"
    )
    _no_communication(world)


@pytest.mark.parametrize("transport", ["auto", "shm"])
@pytest.mark.parametrize(
    ("timeout", "seconds"), [(31, 31.0), (86_400, 86_400.0), (datetime.timedelta(hours=2), 7200.0), (0.5, 0.5)]
)
def test_shared_memory_takes_any_timeout_up_to_a_day(
    world: FakeWorld, transport: str, timeout: object, seconds: float
) -> None:
    world.answer(1, 1)
    with new_signal_group(timeout=timeout, transport=transport) as group:
        assert (group.transport, group.timeout) == ("shm", seconds)
        assert group._endpoint._timeout == seconds


@pytest.mark.parametrize("transport", ["auto", "shm", "gloo"])
@pytest.mark.parametrize(
    "timeout",
    [0, -1, 0.0, 86_400.001, datetime.timedelta(days=1, seconds=1), datetime.timedelta(0), float("nan")],
)
def test_a_timeout_outside_a_day_is_refused(world: FakeWorld, transport: str, timeout: object) -> None:
    with pytest.raises(ValueError) as err:
        new_signal_group(timeout=timeout, transport=transport)
    assert str(err.value) == f"timeout must be > 0 and <= 86400 s (one day), got {timeout!r}"
    _no_communication(world)


@pytest.mark.parametrize("timeout", [True, False, "5", [5]])
def test_a_timeout_that_is_not_seconds_is_a_type_error(world: FakeWorld, timeout: object) -> None:
    with pytest.raises(TypeError) as err:
        new_signal_group(timeout=timeout)
    assert str(err.value) == (f"timeout must be None, seconds (int or float) or a datetime.timedelta, got {timeout!r}")
    _no_communication(world)


@pytest.mark.parametrize("transport", ["nccl", "SHM", "", None, 1])
def test_an_unknown_transport_is_refused(world: FakeWorld, transport: object) -> None:
    with pytest.raises(ValueError) as err:
        new_signal_group(transport=transport)
    assert str(err.value) == f"transport must be one of 'auto', 'shm', 'gloo', got {transport!r}"
    _no_communication(world)


@pytest.mark.parametrize(
    ("lookahead", "error"),
    [(-1, ValueError), (33, ValueError), (2.0, TypeError), (True, TypeError), ("1", TypeError), (None, TypeError)],
)
def test_a_lookahead_outside_half_the_ring_is_refused(world: FakeWorld, lookahead: object, error: type) -> None:
    with pytest.raises(error) as err:
        new_signal_group(lookahead=lookahead)
    if error is ValueError:
        assert str(err.value) == f"lookahead must be between 0 and 32 calls (half the ring), got {lookahead!r}"
    else:
        assert str(err.value) == f"lookahead must be an integer number of calls, got {lookahead!r}"
    _no_communication(world)


@pytest.mark.parametrize("lookahead", [1, 32, np.int64(4)])
def test_lookahead_with_forced_gloo_is_refused(world: FakeWorld, lookahead: object) -> None:
    with pytest.raises(ValueError) as err:
        new_signal_group(transport="gloo", lookahead=lookahead)
    assert str(err.value) == (
        f"lookahead {lookahead} needs the shared-memory transport, but transport='gloo' was asked for: gloo is a "
        "collective in lockstep; use transport='shm' or 'auto' with every rank on one host"
    )
    _no_communication(world)


@pytest.mark.parametrize(
    ("initial", "error", "message"),
    [
        (2**31, ValueError, "initial 2147483648 is outside int32 range [-2147483648, 2147483647]"),
        (1.0, TypeError, "initial must be an integer (int or numpy integer), got 1.0"),
        (None, TypeError, "initial must be an integer (int or numpy integer), got None"),
    ],
)
def test_a_bad_initial_value_is_refused(world: FakeWorld, initial: object, error: type, message: str) -> None:
    with pytest.raises(error) as err:
        new_signal_group(lookahead=2, initial=initial)
    assert str(err.value) == message
    _no_communication(world)


@pytest.mark.parametrize(
    ("ranks", "error", "message"),
    [
        ("01", TypeError, "ranks must be a sequence of global ranks, got '01'"),
        (b"\x00\x01", TypeError, "ranks must be a sequence of global ranks"),
        (7, TypeError, "ranks must be a sequence of global ranks, got 7"),
        ({0, 1}, TypeError, "ranks must be a sequence of global ranks"),
        ([0, True], TypeError, r"ranks must hold integers, got True in \[0, True\]"),
        ([0, 1.0], TypeError, r"ranks must hold integers, got 1.0 in \[0, 1.0\]"),
        ([0, 3], ValueError, r"rank 3 in \[0, 3\] is outside the world of 3 ranks"),
        ([-1, 0], ValueError, r"rank -1 in \[-1, 0\] is outside the world of 3 ranks"),
        ([0, 1, 0], ValueError, r"ranks must not repeat, got \[0, 1, 0\]"),
    ],
)
def test_bad_ranks_are_refused_before_any_communication(
    world: FakeWorld, ranks: object, error: type[Exception], message: str
) -> None:
    world.world_size = 3
    with pytest.raises(error, match=message):
        new_signal_group(ranks)
    _no_communication(world)


@pytest.mark.parametrize("transport", ["auto", "shm"])
def test_a_bad_segment_tag_is_refused_on_every_rank_before_any_communication(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    monkeypatch.setenv("FASTDEPLOY_PATCH_SEGMENT_TAG", "a/b")
    with pytest.raises(ValueError, match=r"^FASTDEPLOY_PATCH_SEGMENT_TAG must be 1 to 32 ASCII letters and digits"):
        new_signal_group(transport=transport)
    _no_communication(world)


def test_forced_gloo_makes_no_segment_and_ignores_the_segment_tag(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTDEPLOY_PATCH_SEGMENT_TAG", "a/b")
    with new_signal_group(transport="gloo") as group:
        assert group.transport == "gloo"


def test_ranks_may_be_numpy_integers_in_any_order(world: FakeWorld) -> None:
    world.world_size = 3
    group = new_signal_group((np.int64(2), np.int32(0)), transport="gloo")
    assert world.new_group_calls[0][0] == [0, 2]
    assert group.ranks == [0, 2] and all(type(rank) is int for rank in group.ranks)
    # A copy: the caller cannot change the group's members.
    group.ranks.append(1)
    assert group.ranks == [0, 2]


@pytest.mark.parametrize(("world_size", "ranks"), [(1, None), (3, [1]), (3, []), (3, (2,))])
def test_fewer_than_two_ranks_make_no_group(world: FakeWorld, world_size: int, ranks: object) -> None:
    world.world_size = world_size
    # Not even initialised: a one-rank worker needs no distributed environment.
    world.initialized = False
    assert new_signal_group(ranks, transport="shm", lookahead=3) is None
    _no_communication(world)
    assert world.default_stores == []


def test_an_uninitialised_world_is_told_to_call_init_parallel_env(world: FakeWorld) -> None:
    world.initialized = False
    with pytest.raises(RuntimeError, match=r"not initialised: call paddle\.distributed\.init_parallel_env\(\)"):
        new_signal_group()
    _no_communication(world)


def test_a_paddle_without_gloo_is_refused_for_forced_gloo_before_any_communication(world: FakeWorld) -> None:
    world.gloo = False
    with pytest.raises(RuntimeError) as err:
        new_signal_group(transport="gloo")
    assert str(err.value) == (
        f"this Paddle build ({paddle.__version__}) has no gloo backend, which the gloo signal transport needs: "
        "install a Paddle wheel built with gloo (the official CPU and GPU wheels are)"
    )
    _no_communication(world)


def test_a_paddle_without_gloo_still_makes_shared_memory_groups(world: FakeWorld) -> None:
    world.gloo = False
    world.answer(1, 1)
    with new_signal_group() as group:
        assert group.transport == "shm"
    assert world.new_group_calls == []


# --- the transport decision ------------------------------------------------------------------------------


def test_auto_picks_shared_memory_when_every_member_attached(world: FakeWorld) -> None:
    world.world_size = 3
    world.answer(1, 1)
    world.answer(1, 2)
    group = new_signal_group(timeout=120, lookahead=4, initial=-2)

    assert (group.transport, group.ranks, group.timeout, group.lookahead) == ("shm", [0, 1, 2], 120.0, 4)
    assert group.paddle_group is None
    assert world.new_group_calls == [] and world.default_stores == []
    endpoint = group._endpoint
    assert isinstance(endpoint, ShmTransport)
    assert (endpoint._lookahead, endpoint._initial, endpoint._timeout) == (4, -2, 120.0)
    assert endpoint.ring.handle.ranks == (0, 1, 2)
    # The creator published the handle and its own answer, then read every member's answer.
    assert [key for key, _ in world.global_store.sets] == [
        "fastdeploy_patch/signal_group/1/shm/handle",
        "fastdeploy_patch/signal_group/1/shm/0",
    ]
    assert world.global_store.gets == [f"fastdeploy_patch/signal_group/1/shm/{r}" for r in (0, 1, 2)]
    group.close()


def test_the_initial_value_is_0_unless_given(world: FakeWorld) -> None:
    world.answer(1, 1)
    with new_signal_group(lookahead=2) as group:
        assert group._endpoint._initial == 0
        # The first lookahead calls return it, before anything was published.
        assert [broadcast_signal(5, src=0, group=group) for _ in range(2)] == [0, 0]


def test_a_non_member_follows_the_decision_without_a_mapping(world: FakeWorld) -> None:
    world.world_size, world.rank = 3, 2
    for member in (0, 1):
        world.answer(1, member)
    group = new_signal_group([0, 1])
    assert (group.transport, group._endpoint) == ("shm", None)
    assert world.global_store.sets == []
    with pytest.raises(ValueError) as err:
        broadcast_signal(1, src=0, group=group)
    assert str(err.value) == "this process (rank 2) is not a member of the signal group (ranks [0, 1])"
    # Closing a group that holds nothing is harmless.
    group.close()


CANNOT = "no /dev/shm here"


@pytest.mark.parametrize(("timeout", "seconds"), [(10, 10.0), (None, None)])
def test_auto_falls_back_to_gloo_when_a_member_cannot_map_the_segment(
    world: FakeWorld, timeout: float | None, seconds: float | None
) -> None:
    world.answer(1, 1, CANNOT)
    group = new_signal_group(timeout=timeout) if timeout is not None else new_signal_group()
    assert (group.transport, group.lookahead, group.timeout) == ("gloo", 0, seconds)
    assert isinstance(group._endpoint, GlooTransport)
    # No deadline thread where gloo's own 30 s is the bound.
    assert (group._endpoint._caller is None) is (timeout is None)
    # The gloo rendezvous uses the creation's own key, apart from the shared-memory handshake's.
    assert world.global_store.sets[-1] == ("fastdeploy_patch/signal_group/1/gloo/address", f"127.0.0.1:{FREE_PORT}")
    assert [call[:2] for call in world.new_group_calls] == [([0, 1], "gloo")]


def test_forced_shm_names_the_members_that_cannot_map_it(world: FakeWorld) -> None:
    world.world_size = 4
    world.answer(1, 1)
    world.answer(1, 2, CANNOT)
    world.answer(1, 3, "permission denied")
    with pytest.raises(RuntimeError) as err:
        new_signal_group(transport="shm")
    assert str(err.value) == (
        "ranks [2, 3] of the signal group (ranks [0, 1, 2, 3]) cannot map its shared-memory segment (rank 2: "
        f"{CANNOT}; rank 3: permission denied); transport='shm' needs every member on one host with a usable /dev/shm"
    )
    assert world.new_group_calls == []


def test_auto_refuses_a_timeout_gloo_cannot_honour_and_says_why_shm_was_not_possible(world: FakeWorld) -> None:
    world.answer(1, 1, CANNOT)
    with pytest.raises(ValueError) as err:
        new_signal_group(timeout=45)
    assert str(err.value) == (
        f"ranks [1] of the signal group (ranks [0, 1]) cannot map its shared-memory segment (rank 1: {CANNOT}), so "
        "transport='auto' falls back to gloo, whose ops fail after a fixed 30 s: timeout 45 s is too long; pass a "
        "timeout <= 30 s, or None, or put the ranks on one host"
    )
    assert world.new_group_calls == []


def test_auto_refuses_lookahead_gloo_cannot_give_and_says_why_shm_was_not_possible(world: FakeWorld) -> None:
    world.answer(1, 1, CANNOT)
    with pytest.raises(ValueError) as err:
        new_signal_group(lookahead=2)
    assert str(err.value) == (
        f"ranks [1] of the signal group (ranks [0, 1]) cannot map its shared-memory segment (rank 1: {CANNOT}), so "
        "transport='auto' falls back to gloo, which cannot give lookahead 2: pass lookahead=0 or put the ranks on "
        "one host"
    )
    assert world.new_group_calls == []


def test_auto_falling_back_to_gloo_needs_gloo(world: FakeWorld) -> None:
    world.gloo = False
    world.answer(1, 1, CANNOT)
    with pytest.raises(RuntimeError, match=r"has no gloo backend, which the gloo signal transport needs"):
        new_signal_group()
    assert world.new_group_calls == []


# --- SignalGroup ------------------------------------------------------------------------------------------


def test_signal_group_describes_itself(world: FakeWorld) -> None:
    world.answer(1, 1)
    group = new_signal_group(timeout=2.5, lookahead=3)
    assert repr(group) == "SignalGroup(transport='shm', ranks=[0, 1], timeout=2.5, lookahead=3)"
    group.close()


def test_close_is_idempotent_and_later_broadcasts_fail(world: FakeWorld) -> None:
    world.answer(1, 1)
    group = new_signal_group()
    ring = group._endpoint.ring
    with mock.patch.object(ring, "close", wraps=ring.close) as close:
        group.close()
        group.close()
    close.assert_called_once_with()
    with pytest.raises(SignalGroupError) as err:
        broadcast_signal(1, src=0, group=group)
    assert str(err.value) == (
        "the signal group (ranks [0, 1]) is unusable: it was closed; every rank must create a new group with "
        "new_signal_group(), in the same order"
    )


def test_the_context_manager_closes_the_group(world: FakeWorld) -> None:
    world.answer(1, 1)
    with new_signal_group() as group:
        assert broadcast_signal(5, src=0, group=group) == 5
    with pytest.raises(SignalGroupError, match="is unusable: it was closed"):
        broadcast_signal(5, src=0, group=group)


def test_a_closed_gloo_group_keeps_its_store_with_the_paddle_group_and_stops_its_deadline_thread(
    world: FakeWorld,
) -> None:
    group = new_signal_group(transport="gloo", timeout=5)
    store = group._endpoint._store
    assert group._endpoint._caller.call(lambda: None, 5) is True
    thread = group._endpoint._caller._thread
    group.close()
    thread.join(5)
    assert not thread.is_alive()
    # Paddle keeps the group registered: the store it was made on must live as long as it does.
    assert getattr(group.paddle_group, GROUP_STORE_ATTRIBUTE) is store is not None
    with pytest.raises(SignalGroupError, match="is unusable: it was closed"):
        broadcast_signal(5, src=0, group=group)


def test_a_closed_gloo_group_without_a_deadline_thread_closes_too(world: FakeWorld) -> None:
    group = new_signal_group(transport="gloo")
    assert group._endpoint._caller is None
    group.close()
    assert group.closed


# --- broadcast_signal over gloo ---------------------------------------------------------------------------


@dataclass
class FakeBroadcast:
    """``paddle.distributed.broadcast``: src's value arrives in the tensor; records each call (tensor, src, group)
    and the thread it ran on."""

    arriving: int | None = None
    error: BaseException | None = None
    block: threading.Event | None = None
    calls: list[tuple[paddle.Tensor, int, object, str]] = field(default_factory=list)
    # What the tensor held when each call started: on src, the value it sends.
    sent_values: list[int] = field(default_factory=list)

    def __call__(self, tensor: paddle.Tensor, src: int, group: object) -> None:
        self.calls.append((tensor, src, group, threading.current_thread().name))
        self.sent_values.append(int(tensor.item()))
        if self.block is not None:
            self.block.wait(10)
        if self.error is not None:
            raise self.error
        if self.arriving is not None:
            tensor.fill_(self.arriving)


@pytest.fixture
def sent(world: FakeWorld) -> Iterator[FakeBroadcast]:
    """``paddle.distributed.broadcast`` stubbed: the gloo transport calls Paddle's public API, as upstream does."""
    fake = FakeBroadcast()
    with mock.patch.object(gloo_transport.dist, "broadcast", side_effect=lambda t, *, src, group: fake(t, src, group)):
        yield fake
    if fake.block is not None:
        # Let a deadline thread that is still inside the fake finish.
        fake.block.set()


@pytest.fixture
def full() -> Iterator[mock.Mock]:
    with mock.patch.object(gloo_transport.paddle, "full", wraps=paddle.full) as spy:
        yield spy


def _gloo_group(
    world: FakeWorld, ranks: list[int] | None = None, timeout: float | None = GLOO_OP_TIMEOUT_S
) -> SignalGroup:
    # What the group's first member would have published, for when this rank is not that member.
    key = f"fastdeploy_patch/signal_group/{api._created + 1}/gloo/address"
    world.global_store.values.setdefault(key, f"127.0.0.1:{FREE_PORT}".encode())
    group = new_signal_group(ranks, timeout=timeout, transport="gloo")
    assert group is not None
    return group


def test_src_sends_its_value_as_a_cpu_int32_tensor(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _gloo_group(world)
    got = broadcast_signal(-1, src=0, group=group)

    assert got == -1 and type(got) is int
    [(tensor, src, used, thread)] = sent.calls
    assert sent.sent_values == [-1]
    assert (src, used, thread) == (0, group.paddle_group, threading.current_thread().name)
    assert tensor.dtype == paddle.int32 and tensor.place.is_cpu_place() and tensor.shape == [1]
    # The one CPU buffer is made with the group, never per step.
    full.assert_called_once_with([1], 0, dtype="int32", device="cpu")


def test_every_broadcast_reuses_the_groups_one_buffer(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _gloo_group(world)
    assert [broadcast_signal(v, group=group) for v in (3, -4, 5)] == [3, -4, 5]
    assert sent.sent_values == [3, -4, 5]
    assert len({id(tensor) for tensor, *_ in sent.calls}) == 1
    assert sent.calls[0][0] is group._endpoint.buffer
    assert full.call_count == 1


def test_src_sends_zero_right_after_another_value(world: FakeWorld, sent: FakeBroadcast) -> None:
    # The reused buffer still holds the last value: a src that skipped writing 0 (NORMAL after CLEARING) would
    # send the stale CLEARING again.
    group = _gloo_group(world)
    assert [broadcast_signal(v, group=group) for v in (-1, 0, -2, 0)] == [-1, 0, -2, 0]
    assert sent.sent_values == [-1, 0, -2, 0]


def test_other_ranks_ignore_their_value_and_return_srcs(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock
) -> None:
    world.world_size, world.rank = 3, 2
    group = _gloo_group(world)
    sent.arriving = 1
    # The non-src value is never looked at, so even a non-integer is fine there.
    assert broadcast_signal(None, src=1, group=group) == 1
    assert broadcast_signal(2**40, src=0, group=group) == 1
    # A non-src rank never writes its own value into the buffer: it holds what last arrived.
    assert sent.sent_values == [0, 1]
    assert full.call_count == 1
    assert [(src, used) for _, src, used, _ in sent.calls] == [(1, group.paddle_group), (0, group.paddle_group)]


@pytest.mark.parametrize("value", [np.int32(7), np.int64(-7), np.uint8(255), 2**31 - 1, -(2**31), 0])
def test_src_accepts_any_integer_in_int32_range(world: FakeWorld, sent: FakeBroadcast, value: object) -> None:
    group = _gloo_group(world)
    got = broadcast_signal(value, group=group)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value", [True, 1.0, "1", None, 1 + 0j, np.float32(1)])
def test_src_refuses_a_non_integer_before_communicating(world: FakeWorld, sent: FakeBroadcast, value: object) -> None:
    group = _gloo_group(world)
    with pytest.raises(TypeError) as err:
        broadcast_signal(value, group=group)
    assert str(err.value) == f"signal value must be an integer (int or numpy integer), got {value!r}"
    assert sent.calls == [] and int(group._endpoint.buffer.item()) == 0


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, np.int64(2**40), np.uint64(2**63)])
def test_src_refuses_a_value_outside_int32_before_communicating(
    world: FakeWorld, sent: FakeBroadcast, value: object
) -> None:
    group = _gloo_group(world)
    with pytest.raises(ValueError) as err:
        broadcast_signal(value, group=group)
    assert str(err.value) == f"signal value {value!r} is outside int32 range [-2147483648, 2147483647]"
    assert sent.calls == [] and int(group._endpoint.buffer.item()) == 0


@pytest.mark.parametrize(
    ("value", "src", "general_checks"),
    [
        (7, 0, []),
        (2**31 - 1, 0, []),
        (-(2**31), 0, []),
        (np.int32(7), 0, ["value"]),
        (ModelWeightsStatus.UPDATING, 0, ["value"]),
        (7, np.int64(0), ["src"]),
    ],
)
def test_a_plain_int_from_a_plain_int_src_goes_straight_to_the_transport(
    world: FakeWorld, sent: FakeBroadcast, value: object, src: object, general_checks: list[str]
) -> None:
    """The src's way to its publish after an idle spell runs from cold caches: a plain int in range from a plain int
    src skips the general checks (which accept numpy integers and int subclasses, and say what is wrong)."""
    group = _gloo_group(world)
    with (
        mock.patch.object(api.arguments, "int32", wraps=api.arguments.int32) as int32,
        mock.patch.object(api.arguments, "src_rank", wraps=api.arguments.src_rank) as src_rank,
    ):
        assert broadcast_signal(value, src=src, group=group) == int(value)
    used = (["value"] if int32.called else []) + (["src"] if src_rank.called else [])
    assert sorted(used) == sorted(general_checks)
    assert sent.sent_values == [int(value)]


@pytest.mark.parametrize("src", [True, 0.0, "0", None])
def test_src_must_be_an_integer_rank(world: FakeWorld, sent: FakeBroadcast, src: object) -> None:
    group = _gloo_group(world)
    with pytest.raises(TypeError, match=re.escape(f"src must be an integer global rank, got {src!r}")):
        broadcast_signal(1, src=src, group=group)
    assert sent.calls == []


def test_src_may_be_a_numpy_integer(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.rank = 1
    group = _gloo_group(world)
    assert broadcast_signal(6, src=np.int64(1), group=group) == 6
    assert sent.sent_values == [6]
    assert sent.calls[0][1] == 1 and type(sent.calls[0][1]) is int


def test_src_is_passed_as_a_global_rank(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size, world.rank = 4, 3
    group = _gloo_group(world, ranks=[3, 1])
    sent.arriving = 8
    assert broadcast_signal(9, src=3, group=group) == 8
    assert broadcast_signal(None, src=1, group=group) == 8
    # paddle.distributed.broadcast takes the global rank and translates it itself.
    assert [src for _, src, _, _ in sent.calls] == [3, 1]
    assert sent.sent_values == [9, 8]


def test_a_single_rank_world_needs_no_group(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    world.world_size = 1
    assert broadcast_signal(-2) == -2
    assert broadcast_signal(np.int16(1), src=np.int64(0)) == 1
    with pytest.raises(TypeError, match=r"got 1\.5"):
        broadcast_signal(1.5)
    with pytest.raises(ValueError, match="src 1 is not a rank of a single-rank world"):
        broadcast_signal(1, src=1)
    assert sent.calls == [] and full.call_count == 0


def test_a_larger_world_must_pass_the_signal_group(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size = 2
    with pytest.raises(ValueError, match=r"world of 2 ranks: create it once with new_signal_group\(\)"):
        broadcast_signal(1)
    assert sent.calls == []


def test_a_group_not_made_by_new_signal_group_is_refused(world: FakeWorld, sent: FakeBroadcast) -> None:
    foreign = Group(0, 9, [0, 1], pg=GlooLikePG(), name="_default_pg9")
    with pytest.raises(TypeError) as err:
        broadcast_signal(1, group=foreign)
    assert str(err.value) == (
        f"group must be the SignalGroup that new_signal_group() returned, got {foreign!r} (a Paddle process group "
        "cannot carry the signal: create the signal group once at worker start)"
    )
    with pytest.raises(
        TypeError, match=r"^group must be the SignalGroup that new_signal_group\(\) returned, got <object"
    ):
        broadcast_signal(1, group=object())
    assert sent.calls == []


def test_src_must_belong_to_the_group(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size = 3
    group = _gloo_group(world, [0, 1])
    with pytest.raises(ValueError) as err:
        broadcast_signal(1, src=2, group=group)
    assert str(err.value) == "src 2 is not a member of the signal group (ranks [0, 1])"
    assert sent.calls == []


def test_a_rank_outside_the_group_cannot_take_part(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size, world.rank = 3, 2
    group = _gloo_group(world, [0, 1])
    with pytest.raises(ValueError, match=r"this process \(rank 2\) is not a member of the signal group"):
        broadcast_signal(1, src=0, group=group)
    assert sent.calls == []


def _assert_unusable(group: SignalGroup, sent: FakeBroadcast, full: mock.Mock, reason: str) -> None:
    calls, fulls = len(sent.calls), full.call_count
    with pytest.raises(SignalGroupError, match=rf"the signal group \(ranks \[0, 1\]\) is unusable: {reason}; "):
        broadcast_signal(99, src=0, group=group)
    assert (len(sent.calls), full.call_count) == (calls, fulls)
    # Refused before the value is written, not only before it is sent.
    assert int(group._endpoint.buffer.item()) != 99


def test_a_peer_that_exited_is_a_signal_group_error(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _gloo_group(world)
    lost = RuntimeError("gloo/transport/tcp/pair.cc:598 Connection closed by peer")
    sent.error = lost
    with pytest.raises(SignalGroupError) as err:
        broadcast_signal(1, src=1, group=group)
    message = str(err.value)
    assert "signal broadcast from src 1 on the signal group (ranks [0, 1]) failed after" in message
    assert "a peer exited or dropped its connection (gloo/transport/tcp/pair.cc:598" in message
    assert err.value.__cause__ is lost
    _assert_unusable(group, sent, full, "a broadcast from src 1 lost a peer")


def test_a_stuck_peer_times_out_at_the_groups_deadline(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _gloo_group(world, timeout=0.2)
    sent.block = threading.Event()
    with pytest.raises(TimeoutError) as err:
        broadcast_signal(1, src=0, group=group)
    message = str(err.value)
    assert "signal broadcast from src 0 on the signal group (ranks [0, 1]) got no answer after" in message
    assert message.endswith(
        "(timeout 0.2 s): a peer is slow or stuck; the group is still usable: call broadcast_signal() again with "
        "src 0 to go on waiting for this call"
    )
    waited = float(message.split("got no answer after ")[1].split(" s")[0])
    assert waited >= 0.2
    # The broadcast was left behind on the group's deadline thread, not on the caller's.
    assert sent.calls[0][3] == f"signal-{group.paddle_group.name}"
    # A retry waits for that same broadcast, whose value stands: nothing is sent or written again.
    with pytest.raises(TimeoutError):
        broadcast_signal(2, src=0, group=group)
    sent.arriving = 7
    sent.block.set()
    assert broadcast_signal(3, src=0, group=group) == 7
    assert sent.sent_values == [1] and full.call_count == 1
    # The next call is a new broadcast.
    sent.block = None
    assert broadcast_signal(4, src=0, group=group) == 7 and sent.sent_values == [1, 4]


def test_a_deadline_group_delivers_srcs_value_through_its_thread(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.rank = 1
    group = _gloo_group(world, timeout=5)
    sent.arriving = 3
    assert broadcast_signal(0, src=0, group=group) == 3
    assert broadcast_signal(0, src=0, group=group) == 3
    assert [(src, used, thread) for _, src, used, thread in sent.calls] == [
        (0, group.paddle_group, f"signal-{group.paddle_group.name}")
    ] * 2


def test_a_deadline_group_reports_a_lost_peer_as_such(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _gloo_group(world, timeout=5)
    sent.error = RuntimeError("pair_rank = 1 connection reset")
    with pytest.raises(SignalGroupError, match=r"src 0 on the signal group \(ranks \[0, 1\]\) failed .*reset"):
        broadcast_signal(0, src=0, group=group)
    _assert_unusable(group, sent, full, "a broadcast from src 0 lost a peer")


def _monotonic(*readings: float) -> Callable[[], float]:
    return mock.Mock(side_effect=list(readings))


def test_gloos_own_limit_on_a_group_without_thread_is_a_timeout(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock
) -> None:
    group = _gloo_group(world)
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:80] TIMEOUT self_rank = none pair_rank = -1")
    sent.error = gloo_timeout
    with (
        mock.patch.object(gloo_transport.time, "monotonic", _monotonic(1000.0, 1030.2)),
        pytest.raises(TimeoutError) as err,
    ):
        broadcast_signal(5, src=0, group=group)
    assert str(err.value) == (
        "signal broadcast from src 0 on the signal group (ranks [0, 1]) got no answer after 30.2 s: gloo fails every "
        "op after a fixed 30 s, and its group cannot be used after that"
    )
    assert err.value.__cause__ is gloo_timeout
    assert sent.calls[0][3] == threading.current_thread().name
    _assert_unusable(group, sent, full, "a broadcast from src 0 failed at gloo's own 30 s limit")


@pytest.mark.parametrize(("waited", "error"), [(29.0, TimeoutError), (28.99, SignalGroupError)])
def test_an_error_within_a_second_of_gloos_limit_counts_as_that_limit(
    world: FakeWorld, sent: FakeBroadcast, waited: float, error: type[Exception]
) -> None:
    group = _gloo_group(world)
    sent.error = RuntimeError("gloo failed")
    with mock.patch.object(gloo_transport.time, "monotonic", _monotonic(50.0, 50.0 + waited)), pytest.raises(error):
        broadcast_signal(5, src=0, group=group)


def test_groups_fail_independently(world: FakeWorld, sent: FakeBroadcast) -> None:
    broken, healthy = _gloo_group(world), _gloo_group(world)
    sent.error = RuntimeError("peer gone")
    with pytest.raises(SignalGroupError):
        broadcast_signal(1, group=broken)
    sent.error = None
    assert broadcast_signal(4, group=healthy) == 4
    assert [used for _, _, used, _ in sent.calls] == [broken.paddle_group, healthy.paddle_group]


# --- _DeadlineCaller --------------------------------------------------------------------------------------


def test_deadline_caller_runs_every_call_on_one_daemon_thread() -> None:
    caller = _DeadlineCaller("signal-test")
    threads: list[threading.Thread] = []
    assert caller.call(lambda: threads.append(threading.current_thread()), 5) is True
    assert caller.call(lambda: threads.append(threading.current_thread()), 5) is True
    assert threads[0] is threads[1] is caller._thread
    assert threads[0].name == "signal-test" and threads[0].daemon


def test_a_stopped_deadline_caller_ends_its_thread_after_the_call_it_runs() -> None:
    caller = _DeadlineCaller("signal-test")
    assert caller.call(lambda: None, 5) is True
    caller.stop()
    caller._thread.join(5)
    assert not caller._thread.is_alive()


def test_deadline_caller_hands_back_what_the_call_raised() -> None:
    caller = _DeadlineCaller("signal-test")
    boom = KeyError("boom")

    def fail() -> None:
        raise boom

    with pytest.raises(KeyError) as err:
        caller.call(fail, 5)
    assert err.value is boom
    # The thread survives a failed call.
    assert caller.call(lambda: None, 5) is True


def test_deadline_caller_gives_up_after_the_timeout() -> None:
    caller = _DeadlineCaller("signal-test")
    release = threading.Event()
    try:
        assert caller.call(lambda: release.wait(10), 0.05) is False
    finally:
        release.set()


# --- gloo calls that end early ------------------------------------------------------------------------------------

GLOO_FILES = {api.__file__, gloo_transport.__file__}


def test_a_gloo_group_without_timeout_runs_on_the_callers_thread_up_to_gloos_own_limit(
    world: FakeWorld, sent: FakeBroadcast
) -> None:
    group = _gloo_group(world, timeout=None)
    assert group.timeout is None and group._endpoint._caller is None
    assert repr(group) == "SignalGroup(transport='gloo', ranks=[0, 1], timeout=None, lookahead=0)"
    assert broadcast_signal(4, src=0, group=group) == 4
    assert sent.calls[0][3] == threading.current_thread().name


def test_a_gloo_call_interrupted_while_gloo_ran_it_leaves_the_group_unusable(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock
) -> None:
    group = _gloo_group(world)
    sent.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        broadcast_signal(1, src=0, group=group)
    _assert_unusable(
        group,
        sent,
        full,
        "a broadcast from src 0 was interrupted while gloo ran it, so this rank cannot know whether it took part in "
        "it",
    )
    with pytest.raises(SignalGroupError) as err:
        broadcast_signal(1, src=0, group=group)
    assert str(err.value).endswith(
        "a rank of the group can no longer take part in step with the others, and a new group cannot be made with a "
        "rank missing (creation is collective over the whole world): restart every rank of the world"
    )


def test_a_gloo_call_interrupted_before_its_op_is_made_again_with_the_retrys_value(
    world: FakeWorld, sent: FakeBroadcast
) -> None:
    group = _gloo_group(world)
    with pytest.raises(Injected):
        traced(
            lambda: broadcast_signal(1, src=0, group=group),
            GLOO_FILES,
            lambda frame: source_line(frame) == "self._sent = n",
        )
    assert sent.sent_values == []
    assert broadcast_signal(2, src=0, group=group) == 2
    assert sent.sent_values == [2]


def test_a_gloo_call_interrupted_after_its_op_returns_the_ops_value_without_a_second_op(
    world: FakeWorld, sent: FakeBroadcast
) -> None:
    world.rank = 1
    group = _gloo_group(world)
    sent.arriving = 6
    with pytest.raises(Injected):
        traced(
            lambda: broadcast_signal(0, src=0, group=group),
            GLOO_FILES,
            lambda frame: source_line(frame) == "return int(buffer.item())",
        )
    sent.arriving = 8
    assert broadcast_signal(0, src=0, group=group) == 6
    assert len(sent.calls) == 1
    assert broadcast_signal(0, src=0, group=group) == 8 and len(sent.calls) == 2
