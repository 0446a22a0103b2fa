"""The shared-memory handshake on a real segment, and the gloo group's store, with every rank of a small world as a
thread sharing one in-memory global store (its ``get`` blocks until the key is set, as Paddle's does): every
ordering of ranks that come, come late, never come, fail or lose the store."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from unittest import mock

import pytest

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import SignalGroupError, rendezvous
from fastdeploy_patch.signal_group.creation import RESTART, Creation, PeerFailed
from fastdeploy_patch.signal_group.rendezvous import ATTACHED, negotiate_shm
from fastdeploy_patch.signal_group.shm_segment import SHM_DIR, ShmHandle, ShmRing
from fastdeploy_patch.signal_group.shm_transport import ShmTransport
from tests.unit.shm_calls import call

NUMBER = 9
KEY = f"fastdeploy_patch/signal_group/{NUMBER}"


class BlockingStore:
    """Paddle's global TCP store between threads: ``get`` waits for the key; ``add`` counts. Records which thread
    (rank) read which key."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self.sets: list[tuple[str, str]] = []
        self.gets: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self._changed:
            self.sets.append((key, value))
            self.values[key] = value.encode()
            self._changed.notify_all()

    def get(self, key: str) -> list[int]:
        self.gets.append((threading.current_thread().name, key))
        with self._changed:
            assert self._changed.wait_for(lambda: key in self.values, timeout=30), f"nobody set {key}"
            return list(self.values[key])

    def add(self, key: str, amount: int) -> int:
        with self._changed:
            self.counters[key] = self.counters.get(key, 0) + amount
            return self.counters[key]


@pytest.fixture
def store() -> Iterator[BlockingStore]:
    fake = BlockingStore()
    with mock.patch.object(paddle_internals, "global_store", return_value=fake):
        yield fake


def _creation(store: object, rank: int, world_size: int, members: list[int], timeout: float = 30.0) -> Creation:
    return Creation(NUMBER, rank=rank, world_size=world_size, members=members, timeout=timeout, store=store)


Outcome = tuple  # (ShmRing | None, failed) or the exception raised


def _run_world(
    store: BlockingStore,
    members: list[int],
    world_size: int,
    step: Callable[[Creation], object],
    *,
    ranks: list[int] | None = None,
    timeout: float = 30.0,
) -> dict[int, object]:
    """Every rank of ``ranks`` (default: the world) creates at once, each in a thread named after it, as
    ``new_signal_group`` does: it arrives, then runs ``step``. Returns what each returned or raised."""
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        try:
            with _creation(store, rank, world_size, members, timeout) as made:
                rendezvous.arrive(made)
                results[rank] = step(made)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[rank] = exc

    threads = [
        threading.Thread(target=rank_main, args=(rank,), name=f"rank{rank}")
        for rank in (range(world_size) if ranks is None else ranks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _world(members: list[int], world_size: int, store: BlockingStore) -> dict[int, tuple[ShmRing | None, dict]]:
    results = _run_world(store, members, world_size, lambda made: negotiate_shm(members, made))
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    assert not errors, errors
    return results


def test_every_member_maps_the_one_segment_and_its_name_is_gone(store: BlockingStore) -> None:
    results = _world([1, 2, 3], 4, store)
    rings = {rank: ring for rank, (ring, failed) in results.items() if ring is not None}
    try:
        assert {rank: failed for rank, (_, failed) in results.items()} == {r: {} for r in range(4)}
        assert sorted(rings) == [1, 2, 3] and results[0][0] is None
        assert len({ring.handle for ring in rings.values()}) == 1
        assert not os.path.exists(rings[1].path)
        assert store.values[f"{KEY}/shm/handle"].decode() == rings[1].handle.to_json()
        assert {store.values[f"{KEY}/shm/{r}"].decode() for r in (1, 2, 3)} == {ATTACHED}
        # Every rank of the world arrived and finished; nobody failed.
        assert store.counters[f"{KEY}/count/arrived"] == 4
        assert store.counters[f"{KEY}/count/shm/done"] == 4
        assert f"{KEY}/count/failures" not in store.counters or store.counters[f"{KEY}/count/failures"] == 0
        ends = [ShmTransport(rings[r], r, timeout=5, lookahead=0, initial=0) for r in (1, 2, 3)]
        assert [call(end, 9 if i == 0 else None, 1) for i, end in enumerate(ends)] == [9, 9, 9]
    finally:
        for ring in rings.values():
            ring.close()


def test_a_member_that_cannot_attach_makes_every_rank_see_the_same_failure(store: BlockingStore) -> None:
    attach = ShmRing.attach

    def attach_or_fail(handle, rank, **kwargs):
        if rank == 2:
            raise OSError(2, "no such segment here")
        return attach(handle, rank, **kwargs)

    with mock.patch.object(ShmRing, "attach", side_effect=attach_or_fail):
        results = _world([0, 1, 2], 3, store)
    assert {rank: failed for rank, (_, failed) in results.items()} == {
        r: {2: "[Errno 2] no such segment here"} for r in range(3)
    }
    # Nobody keeps a mapping, and the creator removed the name all the same.
    assert [ring for ring, _ in results.values()] == [None, None, None]


def test_a_creator_that_cannot_create_fails_every_member(store: BlockingStore) -> None:
    with mock.patch.object(ShmRing, "create", side_effect=OSError(28, "No space left on device")):
        results = _world([0, 1], 2, store)
    expected = {
        0: "cannot create the segment: [Errno 28] No space left on device",
        1: "rank 0 could not create the segment",
    }
    assert {rank: failed for rank, (_, failed) in results.items()} == {0: expected, 1: expected}


def test_the_store_host_returns_only_after_every_rank_finished(store: BlockingStore) -> None:
    polls: list[int] = []

    def sleep(_seconds: float) -> None:
        # The others finish one by one while rank 0 polls.
        polls.append(store.add(f"{KEY}/count/shm/done", 1))

    made = Creation(NUMBER, rank=0, world_size=4, members=[0, 1], timeout=30, store=store, sleep=sleep)
    rendezvous.finish(made, "shm/done")
    assert polls == [2, 3, 4]
    assert store.counters[f"{KEY}/count/shm/done"] == 4


def test_other_ranks_do_not_wait_for_the_rest_to_finish(store: BlockingStore) -> None:
    rendezvous.finish(_creation(store, 3, 4, [0, 1]), "shm/done")
    assert store.counters == {f"{KEY}/count/shm/done/3": 1, f"{KEY}/count/shm/done": 1}


# --- ranks that never come, come late, fail, or lose the store ----------------------------------------------

SHORT_S = 0.3
"""A create_timeout for the ranks that wait for one that never comes: the outcome does not depend on it."""


def _shm_step(members: list[int]) -> Callable[[Creation], object]:
    return lambda made: negotiate_shm(members, made)


def _assert_timed_out(error: object, rank: int, members: list[int], late: str) -> None:
    assert isinstance(error, TimeoutError), error
    assert re.fullmatch(
        rf"creating signal group #{NUMBER} \(ranks {re.escape(str(members))}\) on rank {rank} timed out after "
        rf"\d+\.\d s \(create_timeout {SHORT_S:g} s\): {re.escape(late)}; {re.escape(RESTART)}",
        str(error),
    ), str(error)


def _assert_timed_out_or_told(results: dict, ranks: list[int], members: list[int], late: str) -> list[int]:
    """The first rank to reach its deadline says ``late``; each other rank does too, or learns it from the first's
    marker when that comes before its own deadline. Returns the ranks that timed out."""
    timed_out = [rank for rank in ranks if isinstance(results[rank], TimeoutError)]
    assert timed_out, results
    for rank in timed_out:
        _assert_timed_out(results[rank], rank, members, late)
    for rank in set(ranks) - set(timed_out):
        assert isinstance(results[rank], PeerFailed), results[rank]
        assert "could not create it (TimeoutError: " in str(results[rank]) and late in str(results[rank])
    return timed_out


def _segments_of(store: BlockingStore) -> list[str]:
    handle = store.values.get(f"{KEY}/shm/handle")
    return [] if handle is None else [os.path.join(SHM_DIR, json.loads(handle)["name"])]


def test_a_rank_that_never_calls_is_named_by_every_rank_that_waited_for_it(store: BlockingStore) -> None:
    results = _run_world(store, [0, 1, 2], 3, _shm_step([0, 1, 2]), ranks=[0, 1], timeout=SHORT_S)
    never = (
        "ranks [2] never arrived: they did not call new_signal_group() for it (every rank of the world must create "
        "the same signal groups in the same order)"
    )
    timed_out = _assert_timed_out_or_told(results, [0, 1], [0, 1, 2], never)
    # Nothing was created before everyone came; the ranks that timed out published it.
    assert _segments_of(store) == []
    assert store.counters[f"{KEY}/count/failures"] == len(timed_out)
    assert json.loads(store.values[f"{KEY}/failure"])["reason"].startswith("TimeoutError: creating signal group #9")


def test_a_rank_that_comes_after_the_others_gave_up_fails_at_once_reading_only_the_marker(
    store: BlockingStore,
) -> None:
    _run_world(store, [0, 1, 2], 3, _shm_step([0, 1, 2]), ranks=[0, 1], timeout=SHORT_S)
    store.gets.clear()
    # With all the time in the world: the marker, not its own deadline, ends its wait.
    late = _run_world(store, [0, 1, 2], 3, _shm_step([0, 1, 2]), ranks=[2], timeout=3600)[2]
    assert isinstance(late, PeerFailed) and isinstance(late, SignalGroupError)
    assert re.fullmatch(
        rf"creating signal group #9 \(ranks \[0, 1, 2\]\) on rank 2 failed after \d+\.\d s: rank [01] could not "
        rf"create it \(TimeoutError: creating signal group #9 \(ranks \[0, 1, 2\]\) on rank [01] timed out after "
        rf".* ranks \[2\] never arrived: .*\); {re.escape(RESTART)}",
        str(late),
    ), str(late)
    # The only value it read: the marker (its counts aside, it read no key of this creation or any other).
    assert [key for _, key in store.gets] == [f"{KEY}/failure"]


def test_a_member_that_dies_after_arriving_is_named_as_not_answering(store: BlockingStore) -> None:
    def step(made: Creation) -> object:
        if made.rank == 2:
            # Killed here: no code of its own runs, so it publishes nothing.
            raise SystemExit
        return negotiate_shm([0, 1, 2], made)

    with mock.patch.object(Creation, "publish_failure", autospec=True, side_effect=lambda made, reason: None):
        results = _run_world(store, [0, 1, 2], 3, step, timeout=SHORT_S)
    for rank in (0, 1):
        _assert_timed_out(results[rank], rank, [0, 1, 2], "ranks [2] did not answer the shared-memory handshake")
    # The creator removed its segment on the way out; the attacher unmapped it.
    assert not os.path.exists(_segments_of(store)[0])


def test_a_member_that_fails_tells_the_others_at_once(store: BlockingStore) -> None:
    attach = ShmRing.attach

    def attach_or_interrupt(handle, rank, **kwargs):
        if rank == 2:
            raise KeyboardInterrupt
        return attach(handle, rank, **kwargs)

    with mock.patch.object(ShmRing, "attach", side_effect=attach_or_interrupt):
        results = _run_world(store, [0, 1, 2], 3, _shm_step([0, 1, 2]), timeout=3600)
    assert isinstance(results[2], KeyboardInterrupt)
    for rank in (0, 1):
        assert isinstance(results[rank], PeerFailed), results[rank]
        assert str(results[rank]).startswith(
            f"creating signal group #9 (ranks [0, 1, 2]) on rank {rank} failed after "
        ), results[rank]
        assert f"rank 2 could not create it (KeyboardInterrupt: ); {RESTART}" in str(results[rank])
    assert not os.path.exists(_segments_of(store)[0])


def test_the_store_hosts_exit_fails_every_rank_at_its_next_request(store: BlockingStore) -> None:
    made = _creation(store, 1, 2, [0, 1])
    with mock.patch.object(store, "add", side_effect=ValueError("TCP connection reset by peer")):
        with pytest.raises(SignalGroupError) as err, made:
            rendezvous.arrive(made)
    assert str(err.value).startswith("creating signal group #9 (ranks [0, 1]) on rank 1 failed after ")
    assert str(err.value).endswith(
        "s: Paddle's global store, hosted by rank 0, failed (TCP connection reset by peer): that rank has probably "
        f"exited; {RESTART}"
    )
    assert isinstance(err.value.__cause__, ValueError)


def test_a_store_that_stops_answering_times_out_and_is_not_asked_again(store: BlockingStore) -> None:
    # The store host stopped, or died while a child it forked holds its sockets: a request never gets an answer.
    never = threading.Event()
    made = _creation(store, 1, 2, [0, 1], timeout=SHORT_S)
    try:
        with mock.patch.object(store, "add", side_effect=lambda key, amount: never.wait(30)):
            with pytest.raises(TimeoutError) as err, made:
                rendezvous.arrive(made)
            assert str(err.value).endswith(
                f"(create_timeout {SHORT_S:g} s): Paddle's global store, hosted by rank 0, did not answer: that rank "
                f"is stopped, or it exited while a process it forked still holds its connections; {RESTART}"
            )
            # No failure marker: the request would queue behind the one that never returns.
            assert store.sets == []
    finally:
        never.set()


class FailingStore(BlockingStore):
    """The global store failing at one key, as Paddle's does when its host died (connection reset); the failure may
    be any exception, an interrupt too."""

    def __init__(self, key: str, failure: BaseException) -> None:
        super().__init__()
        self.failing_key = key
        self.failure = failure

    def get(self, key: str) -> list[int]:
        if key == self.failing_key:
            raise self.failure
        return super().get(key)


def _segment_path(store: BlockingStore) -> str:
    handle = ShmHandle.from_json(store.values[f"{KEY}/shm/handle"].decode())
    return os.path.join(SHM_DIR, handle.name)


@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (RuntimeError("Connection reset by peer"), SignalGroupError),
        (TimeoutError("no key within 900 s"), SignalGroupError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
    ids=["reset", "timeout", "interrupt"],
)
def test_the_creator_removes_and_unmaps_its_segment_on_any_failure_while_reading_the_answers(
    failure: BaseException, raised: type[BaseException]
) -> None:
    store = FailingStore(f"{KEY}/shm/1", failure)
    # Rank 1 has answered, so the creator reads its answer, and that read fails.
    store.counters[f"{KEY}/count/shm/answers"] = 1
    closed: list[ShmRing] = []
    close = ShmRing.close

    def recording(ring: ShmRing) -> None:
        closed.append(ring)
        close(ring)

    with (
        mock.patch.object(ShmRing, "close", autospec=True, side_effect=recording),
        pytest.raises(raised) as err,
    ):
        negotiate_shm([0, 1], _creation(store, 0, 2, [0, 1]))
    assert err.value is failure or err.value.__cause__ is failure
    assert not os.path.exists(_segment_path(store))
    (ring,) = closed
    assert ring.path == _segment_path(store) and ring._region.closed


def test_the_creator_removes_its_segment_when_publishing_the_handle_fails() -> None:
    store = BlockingStore()
    created: list[ShmRing] = []
    create = ShmRing.create

    def recording(*args: object, **kwargs: object) -> ShmRing:
        created.append(create(*args, **kwargs))
        return created[-1]

    with (
        mock.patch.object(store, "set", side_effect=ConnectionResetError("store host gone")),
        mock.patch.object(ShmRing, "create", side_effect=recording),
        pytest.raises(SignalGroupError, match=r"global store, hosted by rank 0, failed \(store host gone\)"),
    ):
        negotiate_shm([0, 1], _creation(store, 0, 2, [0, 1]))
    (ring,) = created
    assert not os.path.exists(ring.path) and ring._region.closed


def test_an_attacher_unmaps_but_never_removes_the_segment_when_the_handshake_fails() -> None:
    creator = ShmRing.create([0, 1])
    store = FailingStore(f"{KEY}/shm/0", RuntimeError("Connection reset by peer"))
    store.set(f"{KEY}/shm/handle", creator.handle.to_json())
    store.counters[f"{KEY}/count/shm/handle"] = 1
    store.counters[f"{KEY}/count/shm/answers"] = 1
    attached: list[ShmRing] = []
    attach = ShmRing.attach

    def recording(*args: object, **kwargs: object) -> ShmRing:
        attached.append(attach(*args, **kwargs))
        return attached[-1]

    try:
        with (
            mock.patch.object(ShmRing, "attach", side_effect=recording),
            pytest.raises(SignalGroupError, match="Connection reset by peer"),
        ):
            negotiate_shm([0, 1], _creation(store, 1, 2, [0, 1]))
        (ring,) = attached
        assert ring._region.closed and os.path.exists(creator.path)
    finally:
        creator.close()


# --- the gloo group's own store -----------------------------------------------------------------------------


@pytest.fixture
def gloo(store: BlockingStore) -> Iterator[dict]:
    """Paddle's stores and new_group faked: records each store opened (rank, is_master) and, per new_group call,
    how many members had connected by then."""
    seen: dict = {"opened": [], "new_group": [], "default_stores": []}

    def new_group(members: list[int], backend: str) -> object:
        seen["new_group"].append((threading.current_thread().name, store.counters.get(f"{KEY}/count/gloo/connected")))
        return mock.Mock(spec=[])

    with (
        mock.patch.object(
            paddle_internals,
            "open_tcp_store",
            side_effect=lambda host, port, *, is_master, num_workers, timeout_s: (
                seen["opened"].append((threading.current_thread().name, host, is_master, num_workers)) or object()
            ),
        ),
        mock.patch.object(rendezvous, "store_without_delay"),
        mock.patch.object(rendezvous.gloo_ports, "store_can_bind", return_value=True),
        mock.patch.object(
            rendezvous.dist, "ParallelEnv", return_value=mock.Mock(trainer_endpoints=["127.0.0.1:1"] * 4)
        ),
        mock.patch.object(rendezvous.dist, "new_group", side_effect=new_group),
        mock.patch.object(paddle_internals, "default_store_lent", side_effect=lambda s: _lent(seen, s)),
    ):
        yield seen


@contextlib.contextmanager
def _lent(seen: dict, lent: object) -> Iterator[None]:
    seen["default_stores"].append(lent)
    try:
        yield
    finally:
        seen["default_stores"].append("global")


def _gloo_step(members: list[int], ports: range | None = None) -> Callable[[Creation], object]:
    return lambda made: rendezvous.new_gloo_group(members, made, ports)


def test_gloos_rendezvous_starts_only_once_every_member_is_connected_to_the_groups_store(
    store: BlockingStore, gloo: dict
) -> None:
    results = _run_world(store, [0, 2], 3, _gloo_step([0, 2]))
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    # The first member serves the store (no worker count: the members' arrival is polled), the other connects.
    assert sorted(opened[1:] for opened in gloo["opened"]) == [("127.0.0.1", False, 0), ("127.0.0.1", True, 0)]
    # Each member's new_group (on its creation's worker thread) ran once both members had connected; the
    # non-member's has nothing to wait for and runs on its own thread.
    assert [count for name, count in gloo["new_group"] if name != "rank1"] == [2, 2]
    assert [name for name, _ in gloo["new_group"]].count("rank1") == 1
    assert results[1][1] is None and results[0][1] is not None and results[2][1] is not None


def test_a_creator_that_finds_no_free_port_tells_the_members_at_once(store: BlockingStore, gloo: dict) -> None:
    taken = OSError(98, "every port of 29500-29501 (FASTDEPLOY_PATCH_GLOO_PORTS) is taken on this host")
    with mock.patch.object(rendezvous.gloo_ports, "hold_port", side_effect=taken):
        results = _run_world(store, [0, 1], 2, _gloo_step([0, 1], range(29500, 29502)), timeout=3600)
    assert results[0] is taken
    assert isinstance(results[1], PeerFailed)
    assert (
        "rank 0 could not create it (OSError: [Errno 98] every port of 29500-29501 (FASTDEPLOY_PATCH_GLOO_PORTS) is "
        "taken on this host)"
    ) in str(results[1])
    assert gloo["new_group"] == [] and gloo["opened"] == []


def test_gloos_own_rendezvous_is_given_the_deadline_and_the_global_store_comes_back(
    store: BlockingStore, gloo: dict
) -> None:
    stuck = threading.Event()
    with mock.patch.object(rendezvous.dist, "new_group", side_effect=lambda members, backend: stuck.wait(30)):
        try:
            results = _run_world(store, [0, 1], 2, _gloo_step([0, 1]), timeout=SHORT_S)
        finally:
            stuck.set()
    _assert_timed_out_or_told(results, [0, 1], [0, 1], "gloo's own rendezvous among ranks [0, 1] did not finish")
    # Lent to new_group, and Paddle's default store again once the wait was given up.
    assert gloo["default_stores"].count("global") == 2 and len(gloo["default_stores"]) == 4


def test_the_port_hold_is_shared_with_the_store_and_released_once_it_listens(store: BlockingStore, gloo: dict) -> None:
    hold = mock.Mock()
    hold.getsockname.return_value = ("0.0.0.0", 29517)
    with mock.patch.object(rendezvous.gloo_ports, "hold_port", return_value=hold) as hold_port:
        rendezvous.gloo_store([0, 1], _creation(store, 0, 2, [0, 1]), range(29500, 29600))
    hold_port.assert_called_once_with(range(29500, 29600))
    assert hold.method_calls == [
        mock.call.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
        mock.call.getsockname(),
        mock.call.close(),
    ]
    assert store.values[f"{KEY}/gloo/address"] == b"127.0.0.1:29517"


def test_the_port_hold_is_released_when_the_store_cannot_start(store: BlockingStore, gloo: dict) -> None:
    hold = mock.Mock()
    hold.getsockname.return_value = ("0.0.0.0", 29517)
    with (
        mock.patch.object(rendezvous.gloo_ports, "hold_port", return_value=hold),
        mock.patch.object(paddle_internals, "open_tcp_store", side_effect=SystemError("bind failed")),
        pytest.raises(SystemError, match="bind failed"),
    ):
        rendezvous.gloo_store([0, 1], _creation(store, 0, 2, [0, 1]), None)
    hold.close.assert_called_once_with()
    assert f"{KEY}/gloo/address" not in store.values


def test_a_port_taken_just_before_the_store_binds_it_is_given_up_for_another(store: BlockingStore, gloo: dict) -> None:
    holds = [mock.Mock(), mock.Mock(), mock.Mock()]
    for port, hold in zip((29501, 29502, 29503), holds, strict=True):
        hold.getsockname.return_value = ("0.0.0.0", port)
    with (
        mock.patch.object(rendezvous.gloo_ports, "hold_port", side_effect=holds),
        mock.patch.object(rendezvous.gloo_ports, "store_can_bind", side_effect=[False, False, True]) as can_bind,
    ):
        rendezvous.gloo_store([0, 1], _creation(store, 0, 2, [0, 1]), range(29500, 29600))
    assert can_bind.call_args_list == [mock.call(29501), mock.call(29502), mock.call(29503)]
    assert all(hold.close.call_count == 1 for hold in holds)
    # Only the port the store could bind was started and published.
    assert [opened[1:] for opened in gloo["opened"]] == [("127.0.0.1", True, 0)]
    assert store.values[f"{KEY}/gloo/address"] == b"127.0.0.1:29503"


def test_a_creator_whose_every_port_is_taken_in_time_gives_up(store: BlockingStore, gloo: dict) -> None:
    hold = mock.Mock()
    hold.getsockname.return_value = ("0.0.0.0", 29501)
    with (
        mock.patch.object(rendezvous.gloo_ports, "hold_port", return_value=hold),
        mock.patch.object(rendezvous.gloo_ports, "store_can_bind", return_value=False),
        pytest.raises(OSError) as err,
    ):
        rendezvous.gloo_store([0, 1], _creation(store, 0, 2, [0, 1]), None)
    assert err.value.strerror == (
        "20 ports in a row were taken by another process just before the gloo group's store could bind them"
    )
    assert hold.close.call_count == rendezvous.PORT_ATTEMPTS == 20
    assert gloo["opened"] == []
