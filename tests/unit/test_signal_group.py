"""new_signal_group / broadcast_signal with Paddle's collectives, stores and group registry faked."""

from __future__ import annotations

import datetime
import re
import socket
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import paddle
import pytest
from paddle.distributed import collective
from paddle.distributed.communication.group import Group

from fastdeploy_patch import signal_group
from fastdeploy_patch.signal_group import (
    GLOO_OP_TIMEOUT_S,
    RENDEZVOUS_TIMEOUT_S,
    SignalGroupError,
    _DeadlineCaller,
    broadcast_signal,
    new_signal_group,
)

from .conftest import FakeGlobalStore, FakeTCPStore, GlooLikePG

FREE_PORT = 41234


@dataclass
class FakeWorld:
    """What one rank sees of Paddle's distributed environment; tests change it before acting."""

    rank: int = 0
    world_size: int = 2
    initialized: bool = True
    endpoints: list[str] = field(default_factory=lambda: [f"127.0.0.{i + 1}:6170" for i in range(8)])
    global_store: FakeGlobalStore = field(default_factory=FakeGlobalStore)
    # Every store handed to collective._set_default_store, in order.
    default_stores: list[object] = field(default_factory=list)
    # (ranks, backend, default store while new_group ran) per new_group call.
    new_group_calls: list[tuple[list[int], str, object]] = field(default_factory=list)
    new_group_error: BaseException | None = None

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


@pytest.fixture
def world() -> Iterator[FakeWorld]:
    fake = FakeWorld()
    # Only what the signal group touches of paddle.base.core; a test deletes ProcessGroupGloo to lose gloo.
    fake.core = types.SimpleNamespace(
        create_or_get_global_tcp_store=lambda: fake.global_store,
        TCPStore=FakeTCPStore,
        ProcessGroupGloo=GlooLikePG,
    )
    dist = signal_group.dist
    with (
        mock.patch.object(signal_group, "core", fake.core),
        mock.patch.object(signal_group, "_free_port", return_value=FREE_PORT) as free_port,
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


def test_first_member_publishes_its_own_store_and_lends_it_to_new_group(world: FakeWorld) -> None:
    world.world_size = 3
    group = new_signal_group()

    assert world.global_store.sets == [("fastdeploy_patch/signal_group/1", f"127.0.0.1:{FREE_PORT}")]
    world.free_port.assert_called_once_with("127.0.0.1")
    own_store = FakeTCPStore("127.0.0.1", FREE_PORT, True, 3, RENDEZVOUS_TIMEOUT_S)
    assert world.new_group_calls == [([0, 1, 2], "gloo", own_store)]
    # Lent for the new_group call only: the global store is the default again afterwards.
    assert world.default_stores == [own_store, world.global_store]
    assert isinstance(group, Group) and group.name == "_default_pg1"
    state = signal_group._SIGNAL_GROUPS[group.name]
    assert (state.ranks, state.timeout, state.store, state.caller) == ([0, 1, 2], GLOO_OP_TIMEOUT_S, own_store, None)


def test_other_members_connect_to_the_published_store(world: FakeWorld) -> None:
    world.world_size, world.rank = 4, 2
    world.global_store.values["fastdeploy_patch/signal_group/1"] = b"10.0.0.5:4567"
    group = new_signal_group()

    assert world.global_store.sets == []
    assert world.global_store.gets == ["fastdeploy_patch/signal_group/1"]
    world.free_port.assert_not_called()
    their_store = FakeTCPStore("10.0.0.5", 4567, False, 4, RENDEZVOUS_TIMEOUT_S)
    assert world.new_group_calls == [([0, 1, 2, 3], "gloo", their_store)]
    assert world.default_stores == [their_store, world.global_store]
    assert signal_group._SIGNAL_GROUPS[group.name].store == their_store


def test_the_first_listed_member_serves_on_its_own_endpoint_host(world: FakeWorld) -> None:
    world.world_size, world.rank = 4, 1
    world.endpoints = ["10.1.0.1:6170", "10.1.0.2:6170", "10.1.0.3:6170", "10.1.0.4:6170"]
    new_signal_group([3, 1])

    world.free_port.assert_called_once_with("10.1.0.2")
    assert world.global_store.sets == [("fastdeploy_patch/signal_group/1", f"10.1.0.2:{FREE_PORT}")]
    assert world.new_group_calls[0][:2] == ([1, 3], "gloo")
    assert world.new_group_calls[0][2] == FakeTCPStore("10.1.0.2", FREE_PORT, True, 2, RENDEZVOUS_TIMEOUT_S)


def test_every_group_gets_a_key_of_its_own_also_when_this_rank_is_not_a_member(world: FakeWorld) -> None:
    world.world_size = 3
    outside = new_signal_group([1, 2])
    first = new_signal_group()
    second = new_signal_group([0, 2])

    # A non-member opens no store, but counts the creation so that every rank derives the same next key.
    assert world.new_group_calls[0] == ([1, 2], "gloo", None)
    assert world.default_stores[:2] == [None, world.global_store]
    assert [key for key, _ in world.global_store.sets] == [
        "fastdeploy_patch/signal_group/2",
        "fastdeploy_patch/signal_group/3",
    ]
    assert [world.new_group_calls[i][0] for i in (1, 2)] == [[0, 1, 2], [0, 2]]
    assert len({outside.name, first.name, second.name}) == 3
    assert signal_group._SIGNAL_GROUPS[outside.name].store is None


def test_the_global_store_is_restored_when_new_group_raises(world: FakeWorld) -> None:
    world.new_group_error = RuntimeError("connectFullMesh failed")
    with pytest.raises(RuntimeError, match="connectFullMesh failed"):
        new_signal_group()

    own_store = FakeTCPStore("127.0.0.1", FREE_PORT, True, 2, RENDEZVOUS_TIMEOUT_S)
    assert world.default_stores == [own_store, world.global_store]
    assert signal_group._SIGNAL_GROUPS == {}


@pytest.mark.parametrize(
    ("timeout", "seconds"), [(5, 5.0), (0.25, 0.25), (datetime.timedelta(seconds=12), 12.0), (np.float32(2.5), 2.5)]
)
def test_a_timeout_below_gloos_limit_gets_a_deadline_thread(world: FakeWorld, timeout: object, seconds: float) -> None:
    group = new_signal_group(timeout=timeout)
    state = signal_group._SIGNAL_GROUPS[group.name]
    assert state.timeout == seconds
    assert isinstance(state.caller, _DeadlineCaller)
    assert state.caller.name == f"signal-{group.name}"


@pytest.mark.parametrize("timeout", [GLOO_OP_TIMEOUT_S, 30, datetime.timedelta(seconds=30)])
def test_a_timeout_at_gloos_limit_costs_no_thread(world: FakeWorld, timeout: object) -> None:
    group = new_signal_group(timeout=timeout)
    state = signal_group._SIGNAL_GROUPS[group.name]
    assert (state.timeout, state.caller) == (30.0, None)


@pytest.mark.parametrize(
    "timeout", [0, -1, 0.0, 30.001, 31, datetime.timedelta(0), datetime.timedelta(seconds=-3), float("nan")]
)
def test_a_timeout_outside_gloos_limit_is_refused(world: FakeWorld, timeout: object) -> None:
    with pytest.raises(ValueError, match=r"timeout must be > 0 and <= 30 s, got .*fixed 30 s") as err:
        new_signal_group(timeout=timeout)
    assert repr(timeout) in str(err.value)
    assert world.new_group_calls == []


@pytest.mark.parametrize("timeout", [True, False, "5", None, [5]])
def test_a_timeout_that_is_not_seconds_is_a_type_error(world: FakeWorld, timeout: object) -> None:
    with pytest.raises(TypeError, match="timeout must be seconds") as err:
        new_signal_group(timeout=timeout)
    assert repr(timeout) in str(err.value)
    assert world.new_group_calls == []


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
def test_bad_ranks_are_refused_before_any_collective(
    world: FakeWorld, ranks: object, error: type[Exception], message: str
) -> None:
    world.world_size = 3
    with pytest.raises(error, match=message):
        new_signal_group(ranks)
    assert world.new_group_calls == []
    assert signal_group._created == 0


def test_ranks_may_be_numpy_integers_in_any_order(world: FakeWorld) -> None:
    world.world_size = 3
    group = new_signal_group((np.int64(2), np.int32(0)))
    assert world.new_group_calls[0][0] == [0, 2]
    ranks = signal_group._SIGNAL_GROUPS[group.name].ranks
    assert ranks == [0, 2] and all(type(rank) is int for rank in ranks)


@pytest.mark.parametrize(("world_size", "ranks"), [(1, None), (3, [1]), (3, []), (3, (2,))])
def test_fewer_than_two_ranks_make_no_group(world: FakeWorld, world_size: int, ranks: object) -> None:
    world.world_size = world_size
    # Not even initialised: a one-rank worker needs no distributed environment.
    world.initialized = False
    assert new_signal_group(ranks) is None
    assert world.new_group_calls == []
    assert world.default_stores == []
    assert signal_group._created == 0


def test_an_uninitialised_world_is_told_to_call_init_parallel_env(world: FakeWorld) -> None:
    world.initialized = False
    with pytest.raises(RuntimeError, match=r"not initialised: call paddle\.distributed\.init_parallel_env\(\)"):
        new_signal_group()
    assert world.new_group_calls == []
    assert world.global_store.sets == []
    assert signal_group._created == 0


def test_a_paddle_without_gloo_is_refused(world: FakeWorld) -> None:
    del world.core.ProcessGroupGloo
    with pytest.raises(RuntimeError, match=rf"this Paddle build \({paddle.__version__}\) has no gloo backend"):
        new_signal_group()
    assert world.new_group_calls == []
    assert world.global_store.sets == []


def test_free_port_returns_a_port_nobody_holds() -> None:
    port = signal_group._free_port("127.0.0.1")
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# --- broadcast_signal -------------------------------------------------------------------------------------


@dataclass
class FakeBroadcast:
    """A gloo broadcast: src's value arrives in the tensor; records each call (tensor, src rank in the group,
    process group) and the thread it ran on."""

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
    """Every fake gloo process group's ``broadcast(tensor, src_rank_in_group, sync_op)`` goes to one recorder,
    which notes the process group it was called on."""
    fake = FakeBroadcast()

    def broadcast(pg: GlooLikePG, tensor: paddle.Tensor, src_in_group: int, sync_op: bool) -> object:
        assert sync_op is True
        fake(tensor, src_in_group, pg)
        # A task that must not be needed: gloo has finished by the time broadcast returns.
        return object()

    with (
        mock.patch.object(GlooLikePG, "broadcast", broadcast, create=True),
        mock.patch.object(signal_group.dist, "broadcast", side_effect=AssertionError("dist.broadcast is not used")),
    ):
        yield fake
    if fake.block is not None:
        # Let a deadline thread that is still inside the fake finish.
        fake.block.set()


@pytest.fixture
def full() -> Iterator[mock.Mock]:
    with mock.patch.object(signal_group.paddle, "full", wraps=paddle.full) as spy:
        yield spy


def _group_of(world: FakeWorld, ranks: list[int] | None = None, timeout: float = GLOO_OP_TIMEOUT_S) -> Group:
    # What the group's first member would have published, for when this rank is not that member.
    key = f"fastdeploy_patch/signal_group/{signal_group._created + 1}"
    world.global_store.values.setdefault(key, f"127.0.0.1:{FREE_PORT}".encode())
    group = new_signal_group(ranks, timeout=timeout)
    assert group is not None
    return group


def test_src_sends_its_value_as_a_cpu_int32_tensor(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _group_of(world)
    got = broadcast_signal(-1, src=0, group=group)

    assert got == -1 and type(got) is int
    [(tensor, src, used, thread)] = sent.calls
    assert sent.sent_values == [-1]
    assert (src, used, thread) == (0, group.process_group, threading.current_thread().name)
    assert tensor.dtype == paddle.int32 and tensor.place.is_cpu_place() and tensor.shape == [1]
    # The one CPU buffer is made with the group, never per step.
    full.assert_called_once_with([1], 0, dtype="int32", device="cpu")


def test_every_broadcast_reuses_the_groups_one_buffer(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _group_of(world)
    assert [broadcast_signal(v, group=group) for v in (3, -4, 5)] == [3, -4, 5]
    assert sent.sent_values == [3, -4, 5]
    assert len({id(tensor) for tensor, *_ in sent.calls}) == 1
    assert sent.calls[0][0] is signal_group._SIGNAL_GROUPS[group.name].buffer
    assert full.call_count == 1


def test_other_ranks_ignore_their_value_and_return_srcs(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock
) -> None:
    world.world_size, world.rank = 3, 2
    group = _group_of(world)
    sent.arriving = 1
    # The non-src value is never looked at, so even a non-integer is fine there.
    assert broadcast_signal(None, src=1, group=group) == 1
    assert broadcast_signal(2**40, src=0, group=group) == 1
    # A non-src rank never writes its own value into the buffer: it holds what last arrived.
    assert sent.sent_values == [0, 1]
    assert full.call_count == 1
    assert [(src, used) for _, src, used, _ in sent.calls] == [(1, group.process_group), (0, group.process_group)]


@pytest.mark.parametrize("value", [np.int32(7), np.int64(-7), np.uint8(255), 2**31 - 1, -(2**31), 0])
def test_src_accepts_any_integer_in_int32_range(world: FakeWorld, sent: FakeBroadcast, value: object) -> None:
    group = _group_of(world)
    got = broadcast_signal(value, group=group)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value", [True, 1.0, "1", None, 1 + 0j, np.float32(1)])
def test_src_refuses_a_non_integer_before_communicating(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock, value: object
) -> None:
    group = _group_of(world)
    with pytest.raises(TypeError, match="signal value must be an integer") as err:
        broadcast_signal(value, group=group)
    assert repr(value) in str(err.value)
    assert sent.calls == [] and int(signal_group._SIGNAL_GROUPS[group.name].buffer.item()) == 0


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, np.int64(2**40), np.uint64(2**63)])
def test_src_refuses_a_value_outside_int32_before_communicating(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock, value: object
) -> None:
    group = _group_of(world)
    with pytest.raises(ValueError, match=r"outside int32 range \[-2147483648, 2147483647\]") as err:
        broadcast_signal(value, group=group)
    assert f"signal value {value!r}" in str(err.value)
    assert sent.calls == [] and int(signal_group._SIGNAL_GROUPS[group.name].buffer.item()) == 0


@pytest.mark.parametrize("src", [True, 0.0, "0", None])
def test_src_must_be_an_integer_rank(world: FakeWorld, sent: FakeBroadcast, src: object) -> None:
    group = _group_of(world)
    with pytest.raises(TypeError, match=re.escape(f"src must be an integer global rank, got {src!r}")):
        broadcast_signal(1, src=src, group=group)
    assert sent.calls == []


def test_src_may_be_a_numpy_integer(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    world.rank = 1
    group = _group_of(world)
    assert broadcast_signal(6, src=np.int64(1), group=group) == 6
    assert sent.sent_values == [6]
    assert sent.calls[0][1] == 1


def test_src_is_translated_to_its_rank_within_the_group(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size, world.rank = 4, 3
    group = _group_of(world, ranks=[3, 1])
    sent.arriving = 8
    assert broadcast_signal(9, src=3, group=group) == 8
    assert broadcast_signal(None, src=1, group=group) == 8
    # Global rank 3 is the group's rank 1, global rank 1 its rank 0.
    assert [src for _, src, _, _ in sent.calls] == [1, 0]
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
    with pytest.raises(ValueError, match="was not created by new_signal_group"):
        broadcast_signal(1, group=foreign)
    with pytest.raises(ValueError, match="was not created by new_signal_group"):
        broadcast_signal(1, group=object())
    assert sent.calls == []


def test_src_must_belong_to_the_group(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size = 3
    group = _group_of(world, [0, 1])
    with pytest.raises(ValueError, match=r"src 2 is not a member of the signal group \(ranks \[0, 1\]\)"):
        broadcast_signal(1, src=2, group=group)
    assert sent.calls == []


def test_a_rank_outside_the_group_cannot_take_part(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.world_size, world.rank = 3, 2
    group = _group_of(world, [0, 1])
    with pytest.raises(ValueError, match=r"this process \(rank 2\) is not a member of the signal group"):
        broadcast_signal(1, src=0, group=group)
    assert sent.calls == []


def _assert_unusable(group: Group, sent: FakeBroadcast, full: mock.Mock, reason: str) -> None:
    calls, fulls = len(sent.calls), full.call_count
    with pytest.raises(SignalGroupError, match=rf"the signal group \(ranks \[0, 1\]\) is unusable: {reason}"):
        broadcast_signal(99, src=0, group=group)
    assert (len(sent.calls), full.call_count) == (calls, fulls)
    # Refused before the value is written, not only before it is sent.
    assert int(signal_group._SIGNAL_GROUPS[group.name].buffer.item()) != 99


def test_a_peer_that_exited_is_a_signal_group_error(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _group_of(world)
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
    group = _group_of(world, timeout=0.2)
    sent.block = threading.Event()
    with pytest.raises(TimeoutError) as err:
        broadcast_signal(1, src=0, group=group)
    message = str(err.value)
    assert "signal broadcast from src 0 on the signal group (ranks [0, 1]) got no answer after" in message
    assert "(timeout 0.2 s): a peer is stuck" in message
    waited = float(message.split("got no answer after ")[1].split(" s")[0])
    assert waited >= 0.2
    # The broadcast was left behind on the group's deadline thread, not on the caller's.
    assert sent.calls[0][3] == f"signal-{group.name}"
    _assert_unusable(group, sent, full, "a broadcast from src 0 timed out")


def test_a_deadline_group_delivers_srcs_value_through_its_thread(world: FakeWorld, sent: FakeBroadcast) -> None:
    world.rank = 1
    group = _group_of(world, timeout=5)
    sent.arriving = 3
    assert broadcast_signal(0, src=0, group=group) == 3
    assert broadcast_signal(0, src=0, group=group) == 3
    assert [(src, used, thread) for _, src, used, thread in sent.calls] == [
        (0, group.process_group, f"signal-{group.name}")
    ] * 2


def test_a_deadline_group_reports_a_lost_peer_as_such(world: FakeWorld, sent: FakeBroadcast, full: mock.Mock) -> None:
    group = _group_of(world, timeout=5)
    sent.error = RuntimeError("pair_rank = 1 connection reset")
    with pytest.raises(SignalGroupError, match=r"src 0 on the signal group \(ranks \[0, 1\]\) failed .*reset"):
        broadcast_signal(0, src=0, group=group)
    _assert_unusable(group, sent, full, "a broadcast from src 0 lost a peer")


def _monotonic(*readings: float) -> Callable[[], float]:
    return mock.Mock(side_effect=list(readings))


def test_gloos_own_limit_on_a_group_without_thread_is_a_timeout(
    world: FakeWorld, sent: FakeBroadcast, full: mock.Mock
) -> None:
    group = _group_of(world)
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:80] TIMEOUT self_rank = none pair_rank = -1")
    sent.error = gloo_timeout
    with (
        mock.patch.object(signal_group.time, "monotonic", _monotonic(1000.0, 1030.2)),
        pytest.raises(TimeoutError) as err,
    ):
        broadcast_signal(5, src=0, group=group)
    assert str(err.value) == (
        "signal broadcast from src 0 on the signal group (ranks [0, 1]) got no answer after 30.2 s "
        "(timeout 30 s): a peer is stuck and is not taking part"
    )
    assert err.value.__cause__ is gloo_timeout
    assert sent.calls[0][3] == threading.current_thread().name
    _assert_unusable(group, sent, full, "a broadcast from src 0 timed out")


@pytest.mark.parametrize(("waited", "error"), [(29.0, TimeoutError), (28.99, SignalGroupError)])
def test_an_error_within_a_second_of_gloos_limit_counts_as_that_limit(
    world: FakeWorld, sent: FakeBroadcast, waited: float, error: type[Exception]
) -> None:
    group = _group_of(world)
    sent.error = RuntimeError("gloo failed")
    with mock.patch.object(signal_group.time, "monotonic", _monotonic(50.0, 50.0 + waited)), pytest.raises(error):
        broadcast_signal(5, src=0, group=group)


def test_groups_fail_independently(world: FakeWorld, sent: FakeBroadcast) -> None:
    broken, healthy = _group_of(world), _group_of(world)
    sent.error = RuntimeError("peer gone")
    with pytest.raises(SignalGroupError):
        broadcast_signal(1, group=broken)
    sent.error = None
    assert broadcast_signal(4, group=healthy) == 4
    assert [used for _, _, used, _ in sent.calls] == [broken.process_group, healthy.process_group]


# --- _DeadlineCaller --------------------------------------------------------------------------------------


def test_deadline_caller_runs_every_call_on_one_daemon_thread() -> None:
    caller = _DeadlineCaller("signal-test")
    threads: list[threading.Thread] = []
    assert caller.call(lambda: threads.append(threading.current_thread()), 5) is True
    assert caller.call(lambda: threads.append(threading.current_thread()), 5) is True
    assert threads[0] is threads[1] is caller._thread
    assert threads[0].name == "signal-test" and threads[0].daemon


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
