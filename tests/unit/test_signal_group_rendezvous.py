"""The shared-memory handshake on a real segment, with every rank of a small world as a thread sharing one
in-memory global store (its ``get`` blocks until the key is set, as Paddle's does)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from unittest import mock

import pytest

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.signal_group import rendezvous
from fastdeploy_patch.signal_group.rendezvous import ATTACHED, negotiate_shm
from fastdeploy_patch.signal_group.shm_segment import SHM_DIR, ShmHandle, ShmRing
from fastdeploy_patch.signal_group.shm_transport import ShmTransport
from tests.unit.shm_calls import call

KEY = "fastdeploy_patch/signal_group/9"


class BlockingStore:
    """Paddle's global TCP store between threads: ``get`` waits for the key; ``add`` counts."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self.sets: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self._changed:
            self.sets.append((key, value))
            self.values[key] = value.encode()
            self._changed.notify_all()

    def get(self, key: str) -> list[int]:
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


def _world(members: list[int], world_size: int) -> dict[int, tuple[ShmRing | None, dict[int, str]]]:
    """Every rank of the world negotiates at once; returns what each got."""
    results: dict[int, tuple[ShmRing | None, dict[int, str]]] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = negotiate_shm(members, rank, world_size, KEY)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def test_every_member_maps_the_one_segment_and_its_name_is_gone(store: BlockingStore) -> None:
    results = _world([1, 2, 3], 4)
    rings = {rank: ring for rank, (ring, failed) in results.items() if ring is not None}
    try:
        assert {rank: failed for rank, (_, failed) in results.items()} == {r: {} for r in range(4)}
        assert sorted(rings) == [1, 2, 3] and results[0][0] is None
        assert len({ring.handle for ring in rings.values()}) == 1
        assert not os.path.exists(rings[1].path)
        assert store.values[f"{KEY}/shm/handle"].decode() == rings[1].handle.to_json()
        assert {store.values[f"{KEY}/shm/{r}"].decode() for r in (1, 2, 3)} == {ATTACHED}
        assert store.counters[f"{KEY}/shm/read"] == 4
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
        results = _world([0, 1, 2], 3)
    assert {rank: failed for rank, (_, failed) in results.items()} == {
        r: {2: "[Errno 2] no such segment here"} for r in range(3)
    }
    # Nobody keeps a mapping, and the creator removed the name all the same.
    assert [ring for ring, _ in results.values()] == [None, None, None]


def test_a_creator_that_cannot_create_fails_every_member(store: BlockingStore) -> None:
    with mock.patch.object(ShmRing, "create", side_effect=OSError(28, "No space left on device")):
        results = _world([0, 1], 2)
    expected = {
        0: "cannot create the segment: [Errno 28] No space left on device",
        1: "rank 0 could not create the segment",
    }
    assert {rank: failed for rank, (_, failed) in results.items()} == {0: expected, 1: expected}


def test_the_store_host_returns_only_after_every_rank_read_the_answers(store: BlockingStore) -> None:
    polls: list[int] = []

    def sleep(_seconds: float) -> None:
        # The others arrive one by one while rank 0 polls.
        polls.append(store.add(f"{KEY}/shm/read", 1))

    with mock.patch.object(rendezvous.time, "sleep", side_effect=sleep):
        rendezvous._all_read(store, f"{KEY}/shm/read", 0, 4)
    assert polls == [2, 3, 4]
    assert store.counters[f"{KEY}/shm/read"] == 4


def test_other_ranks_do_not_wait_for_the_rest(store: BlockingStore) -> None:
    rendezvous._all_read(store, f"{KEY}/shm/read", 3, 4)
    assert store.counters[f"{KEY}/shm/read"] == 1


def _clock(*readings: float) -> Callable[[], float]:
    return mock.Mock(side_effect=list(readings))


def test_the_store_host_gives_up_after_the_rendezvous_timeout(store: BlockingStore) -> None:
    with (
        mock.patch.object(rendezvous.time, "monotonic", _clock(0.0, 1.0, 300.5)),
        mock.patch.object(rendezvous.time, "sleep"),
        pytest.raises(RuntimeError) as err,
    ):
        rendezvous._all_read(store, f"{KEY}/shm/read", 0, 3)
    assert str(err.value) == (
        "only 1 of 3 ranks finished creating a signal group within 300 s: every rank of the world must call "
        "new_signal_group(), in the same order"
    )


def test_the_store_host_still_waits_when_the_clock_reads_its_deadline_exactly(store: BlockingStore) -> None:
    def sleep(_seconds: float) -> None:
        store.add(f"{KEY}/shm/read", 1)

    with (
        mock.patch.object(rendezvous.time, "monotonic", _clock(0.0, 300.0, 300.5)),
        mock.patch.object(rendezvous.time, "sleep", side_effect=sleep),
        pytest.raises(RuntimeError, match=r"^only 2 of 3 ranks finished creating a signal group within 300 s: "),
    ):
        rendezvous._all_read(store, f"{KEY}/shm/read", 0, 3)


def test_the_creator_hosting_the_store_returns_from_the_handshake_only_after_every_rank_read(
    store: BlockingStore,
) -> None:
    """Rank 0 alone, rank 1's answer already there: rank 0 polls the read count until rank 1 adds its read."""
    store.set(f"{KEY}/shm/1", ATTACHED)
    polls: list[int] = []

    def sleep(_seconds: float) -> None:
        polls.append(store.add(f"{KEY}/shm/read", 1))

    with mock.patch.object(rendezvous.time, "sleep", side_effect=sleep):
        ring, failed = negotiate_shm([0, 1], 0, 2, KEY)
    try:
        assert (failed, polls, store.counters[f"{KEY}/shm/read"]) == ({}, [2], 2)
    finally:
        ring.close()


def test_a_mapping_is_released_when_the_handshake_fails_at_the_end(store: BlockingStore) -> None:
    store.set(f"{KEY}/shm/1", ATTACHED)
    closed = []
    close = ShmRing.close
    with (
        mock.patch.object(rendezvous, "_all_read", side_effect=RuntimeError("only 1 of 2")),
        mock.patch.object(ShmRing, "close", autospec=True, side_effect=lambda ring: closed.append(close(ring))),
        pytest.raises(RuntimeError, match="only 1 of 2"),
    ):
        negotiate_shm([0, 1], 0, 2, KEY)
    assert len(closed) == 1


def test_a_failed_handshake_releases_nothing_it_does_not_hold(store: BlockingStore) -> None:
    store.set(f"{KEY}/shm/0", "cannot create the segment: boom")
    store.set(f"{KEY}/shm/handle", '{"error": "boom"}')
    with (
        mock.patch.object(rendezvous, "_all_read", side_effect=RuntimeError("only 1 of 2")),
        pytest.raises(RuntimeError, match="only 1 of 2"),
    ):
        negotiate_shm([0, 1], 1, 2, KEY)


class FailingStore(BlockingStore):
    """The global store failing at one key, as Paddle's does when its host died (connection reset) or the key never
    came (timeout); the failure may be any exception, an interrupt too."""

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
    "failure",
    [RuntimeError("Connection reset by peer"), TimeoutError("no key within 900 s"), KeyboardInterrupt()],
    ids=["reset", "timeout", "interrupt"],
)
def test_the_creator_removes_and_unmaps_its_segment_on_any_failure_while_reading_the_answers(
    failure: BaseException,
) -> None:
    store = FailingStore(f"{KEY}/shm/1", failure)
    closed: list[ShmRing] = []
    close = ShmRing.close

    def recording(ring: ShmRing) -> None:
        closed.append(ring)
        close(ring)

    with (
        mock.patch.object(paddle_internals, "global_store", return_value=store),
        mock.patch.object(ShmRing, "close", autospec=True, side_effect=recording),
        pytest.raises(type(failure)) as err,
    ):
        negotiate_shm([0, 1], 0, 2, KEY)
    assert err.value is failure
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
        mock.patch.object(paddle_internals, "global_store", return_value=store),
        mock.patch.object(store, "set", side_effect=ConnectionResetError("store host gone")),
        mock.patch.object(ShmRing, "create", side_effect=recording),
        pytest.raises(ConnectionResetError),
    ):
        negotiate_shm([0, 1], 0, 2, KEY)
    (ring,) = created
    assert not os.path.exists(ring.path) and ring._region.closed


def test_an_attacher_unmaps_but_never_removes_the_segment_when_the_handshake_fails() -> None:
    creator = ShmRing.create([0, 1])
    store = FailingStore(f"{KEY}/shm/0", RuntimeError("Connection reset by peer"))
    store.set(f"{KEY}/shm/handle", creator.handle.to_json())
    attached: list[ShmRing] = []
    attach = ShmRing.attach

    def recording(*args: object, **kwargs: object) -> ShmRing:
        attached.append(attach(*args, **kwargs))
        return attached[-1]

    try:
        with (
            mock.patch.object(paddle_internals, "global_store", return_value=store),
            mock.patch.object(ShmRing, "attach", side_effect=recording),
            pytest.raises(RuntimeError, match="Connection reset by peer"),
        ):
            negotiate_shm([0, 1], 1, 2, KEY)
        (ring,) = attached
        assert ring._region.closed and os.path.exists(creator.path)
    finally:
        creator.close()


def test_a_free_port_is_an_ephemeral_tcp_port_nobody_holds() -> None:
    port = rendezvous._free_port("127.0.0.1")
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
