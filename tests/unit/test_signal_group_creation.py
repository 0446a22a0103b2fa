"""One creation's deadline and polls (fake clock), its worker thread, the port hold of a gloo group's store (real
sockets), the arguments ``create_timeout`` and ``FASTDEPLOY_PATCH_GLOO_PORTS``, and the rule that a failed creation
refuses every later one on its rank."""

from __future__ import annotations

import datetime
import errno
import json
import socket
import threading
from collections.abc import Iterator
from unittest import mock

import pytest

from fastdeploy_patch.signal_group import SignalGroupError, arguments, gloo_ports, new_signal_group, rendezvous
from fastdeploy_patch.signal_group import group as api
from fastdeploy_patch.signal_group.creation import (
    POLL_CAP_S,
    POLL_FIRST_S,
    RESTART,
    AgreedRefusal,
    Creation,
    PeerFailed,
    _Worker,
)

from .conftest import FakeGlobalStore
from .test_signal_group import CANNOT, FakeWorld, fake_world

KEY = "fastdeploy_patch/signal_group/4"


@pytest.fixture
def world() -> Iterator[FakeWorld]:
    with fake_world() as fake:
        yield fake


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` of one creation: a sleep moves the clock and runs ``on_sleep``."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.on_sleep = lambda: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.on_sleep()


def _creation(store: object, clock: FakeClock, timeout: float = 1.0, rank: int = 1) -> Creation:
    return Creation(
        4,
        rank=rank,
        world_size=3,
        members=[0, 1, 2],
        timeout=timeout,
        store=store,
        clock=clock.monotonic,
        sleep=clock.sleep,
    )


# --- polls and the deadline ----------------------------------------------------------------------------------


def test_polls_start_fast_and_back_off_to_the_cap() -> None:
    store, clock = FakeGlobalStore(peers_done=0), FakeClock()

    def on_sleep() -> None:
        # The other two ranks arrive after the 10th and the 11th pause.
        if len(clock.sleeps) in (10, 11):
            store.counters[f"{KEY}/count/arrived"] += 1

    clock.on_sleep = on_sleep
    made = _creation(store, clock, timeout=60)
    made.arrive("arrived")
    made.await_all("arrived", made.world, "never arrived")
    assert clock.sleeps == [pytest.approx(min(POLL_FIRST_S * 2**i, POLL_CAP_S)) for i in range(11)]
    # Each poll looked for a failure marker first, then at the count.
    polls = [key for key, amount in store.adds if amount == 0]
    assert polls == [f"{KEY}/count/failures", f"{KEY}/count/arrived"] * 12


def test_the_deadline_names_the_late_ranks_and_the_time_waited() -> None:
    store, clock = FakeGlobalStore(peers_done=0), FakeClock()
    store.counters[f"{KEY}/count/arrived/2"] = 1
    store.counters[f"{KEY}/count/arrived"] = 1
    made = _creation(store, clock, timeout=2.5)
    made.arrive("arrived")
    with pytest.raises(TimeoutError) as err:
        made.await_all("arrived", made.world, "never arrived")
    assert str(err.value) == (
        "creating signal group #4 (ranks [0, 1, 2]) on rank 1 timed out after 2.5 s (create_timeout 2.5 s): ranks "
        f"[0] never arrived; {RESTART}"
    )
    # It never slept past its deadline.
    assert clock.now == pytest.approx(102.5)


def test_a_count_complete_at_the_deadline_still_counts() -> None:
    store, clock = FakeGlobalStore(peers_done=0), FakeClock()
    clock.on_sleep = lambda: store.counters.__setitem__(f"{KEY}/count/step", 3) if clock.now >= 101 else None
    made = _creation(store, clock, timeout=1.0)
    made.await_all("step", [0, 1, 2], "did not")
    assert clock.now == pytest.approx(101.0)


def test_a_published_failure_ends_the_wait_before_the_count() -> None:
    store, clock = FakeGlobalStore(), FakeClock()
    store.set(f"{KEY}/failure", json.dumps({"rank": 2, "reason": "OSError: no port"}))
    store.counters[f"{KEY}/count/failures"] = 1
    with pytest.raises(PeerFailed) as err:
        _creation(store, clock).await_all("arrived", [0, 1, 2], "never arrived")
    assert str(err.value) == (
        "creating signal group #4 (ranks [0, 1, 2]) on rank 1 failed after 0.0 s: rank 2 could not create it "
        f"(OSError: no port); {RESTART}"
    )
    assert clock.sleeps == []


# --- what a failing rank publishes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "published"),
    [
        (TimeoutError(f"ranks [2] never arrived; {RESTART}"), "TimeoutError: ranks [2] never arrived"),
        (KeyboardInterrupt(), "KeyboardInterrupt: "),
        (PeerFailed("rank 2 could not"), None),
        (AgreedRefusal(ValueError("timeout 45 s is too long")), None),
    ],
    ids=["timeout", "interrupt", "peer-failed", "agreed"],
)
def test_a_failing_rank_publishes_why_unless_it_only_learned_it_or_every_rank_agreed(
    error: BaseException, published: str | None
) -> None:
    store, clock = FakeGlobalStore(), FakeClock()
    with pytest.raises(type(error)), _creation(store, clock):
        raise error
    if published is None:
        assert store.sets == [] and store.adds == []
    else:
        assert store.sets == [(f"{KEY}/failure", json.dumps({"rank": 1, "reason": published}))]
        assert store.adds == [(f"{KEY}/count/failures", 1)]


def test_a_marker_that_cannot_be_published_does_not_hide_the_error() -> None:
    store, clock = FakeGlobalStore(), FakeClock()
    with (
        mock.patch.object(store, "set", side_effect=ValueError("TCP connection reset by peer")),
        pytest.raises(OSError, match="no port"),
        _creation(store, clock),
    ):
        raise OSError("no port")


def test_the_worker_thread_ends_with_the_creation() -> None:
    store, clock = FakeGlobalStore(), FakeClock()
    with _creation(store, clock) as made:
        made.arrive("arrived")
        thread = made._worker._thread
        assert thread.daemon and thread.name == "signal-group-creation-4"
    # Gone once the creation returns: a fork right after it copies no thread of ours.
    assert not thread.is_alive()


def test_a_creation_that_made_no_call_starts_no_thread() -> None:
    worker = _Worker("w")
    worker.stop()
    assert worker._thread is None


def test_a_stuck_worker_refuses_every_later_call_without_running_it() -> None:
    release = threading.Event()
    worker = _Worker("w")
    try:
        assert worker.run(lambda: release.wait(30), 0.05, "the first call") == (False, None)
        assert worker.stuck == "the first call"
        ran = []
        assert worker.run(lambda: ran.append(1), 5, "the second call") == (False, None)
        assert ran == []
    finally:
        release.set()
        worker.stop()


def test_a_wait_interrupted_while_the_call_runs_on_leaves_the_worker_stuck_and_unjoined() -> None:
    release = threading.Event()
    worker = _Worker("w")
    interrupted = mock.Mock(spec=["set", "wait"])
    interrupted.wait.side_effect = KeyboardInterrupt
    try:
        # Its thread started first: starting a thread waits on an Event of its own.
        assert worker.run(lambda: "warm", 5, "a first call") == (True, "warm")
        with mock.patch.object(threading, "Event", return_value=interrupted), pytest.raises(KeyboardInterrupt):
            worker.run(lambda: release.wait(30), 5, "a store request")
        assert worker.stuck == "a store request"
        # Returns at once: it does not wait for a thread that may never come back.
        worker.stop()
        assert worker._thread.is_alive()
    finally:
        release.set()


def test_a_call_past_the_deadline_names_what_did_not_finish() -> None:
    release = threading.Event()
    made = Creation(4, rank=0, world_size=2, members=[0, 1], timeout=0.05, store=FakeGlobalStore())
    try:
        with pytest.raises(TimeoutError) as err:
            made.call(lambda: release.wait(30), "gloo's own rendezvous among ranks [0, 1]")
    finally:
        release.set()
    assert str(err.value).startswith("creating signal group #4 (ranks [0, 1]) on rank 0 timed out after ")
    assert str(err.value).endswith(
        f"s (create_timeout 0.05 s): gloo's own rendezvous among ranks [0, 1] did not finish; {RESTART}"
    )


# --- the arguments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"), [(300, 300.0), (0.5, 0.5), (datetime.timedelta(minutes=2), 120.0), (86_400, 86_400.0)]
)
def test_create_timeout_takes_seconds_or_a_timedelta(value: object, seconds: float) -> None:
    assert arguments.create_timeout_seconds(value) == seconds


@pytest.mark.parametrize("value", [0, -1, 86_400.5, datetime.timedelta(0), float("nan")])
def test_create_timeout_outside_a_day_is_refused(value: object) -> None:
    with pytest.raises(ValueError) as err:
        arguments.create_timeout_seconds(value)
    assert str(err.value) == f"create_timeout must be > 0 and <= 86400 s (one day), got {value!r}"


@pytest.mark.parametrize("value", [None, True, "300", [1]])
def test_create_timeout_that_is_not_seconds_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError) as err:
        arguments.create_timeout_seconds(value)
    assert str(err.value) == (f"create_timeout must be seconds (int or float) or a datetime.timedelta, got {value!r}")


@pytest.mark.parametrize(
    ("text", "ports"),
    [
        (None, None),
        ("", None),
        ("29500-29599", range(29500, 29600)),
        ("80-80", range(80, 81)),
        (" 1 - 65535", range(1, 65536)),
    ],
)
def test_the_gloo_port_range_is_low_dash_high(text: str | None, ports: range | None) -> None:
    assert arguments.gloo_ports(text) == ports


@pytest.mark.parametrize("text", ["29500", "29599-29500", "0-10", "1-65536", "a-b", "29500:29599", "-5", "1-2-3"])
def test_a_bad_gloo_port_range_is_refused(text: str) -> None:
    with pytest.raises(ValueError) as err:
        arguments.gloo_ports(text)
    assert str(err.value) == (
        "FASTDEPLOY_PATCH_GLOO_PORTS must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535 (the TCP ports a gloo signal "
        f"group's rendezvous store may listen on, for example 29500-29599), got {text!r}"
    )


# --- the port hold (real sockets) ----------------------------------------------------------------------------


def _bind_fails(port: int, *, reuse: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        if reuse:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return True
        return False


def test_a_held_port_cannot_be_bound_by_anyone_else() -> None:
    with gloo_ports.hold_port(None) as hold:
        address, port = hold.getsockname()
        assert address == "0.0.0.0" and 1024 <= port <= 65535
        assert _bind_fails(port) and _bind_fails(port, reuse=True)
        # Shared with the store: a socket with SO_REUSEADDR (as libuv's) may now bind it, without listening yet.
        assert gloo_ports.share_with_store(hold) == port
        assert hold.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert _bind_fails(port) and not _bind_fails(port, reuse=True)


def test_the_store_could_bind_a_port_unless_someone_listens_on_it_or_holds_it_strictly() -> None:
    with gloo_ports.hold_port(None) as hold:
        port = hold.getsockname()[1]
        assert not gloo_ports.store_can_bind(port)
        gloo_ports.share_with_store(hold)
        assert gloo_ports.store_can_bind(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen()
            assert not gloo_ports.store_can_bind(port)
        assert gloo_ports.store_can_bind(port)


def test_a_bind_check_that_fails_for_another_reason_raises() -> None:
    with (
        mock.patch.object(socket.socket, "bind", side_effect=OSError(errno.EADDRNOTAVAIL, "no such address")),
        pytest.raises(OSError, match="no such address"),
    ):
        gloo_ports.store_can_bind(29500)


def _free_run(length: int) -> tuple[range, list[socket.socket]]:
    """A range of ``length`` ports that are free now: held by the caller's sockets until it closes them."""
    for _ in range(50):
        with gloo_ports.hold_port(None) as probe:
            first = probe.getsockname()[1]
        if first + length > 65536:
            continue
        held = []
        try:
            for port in range(first, first + length):
                held.append(gloo_ports._bind(port))
        except OSError:
            for sock in held:
                sock.close()
            continue
        return range(first, first + length), held
    pytest.fail(f"found no {length} free ports in a row")


def test_a_range_gives_a_free_port_of_it_past_the_taken_ones() -> None:
    ports, held = _free_run(4)
    # Keep all but one taken: the hold must find that one, wherever it starts.
    free = ports[2]
    held.pop(2).close()
    try:
        for _ in range(8):
            with gloo_ports.hold_port(ports) as hold:
                assert hold.getsockname()[1] == free
    finally:
        for sock in held:
            sock.close()


def test_a_range_with_every_port_taken_is_an_error_naming_it() -> None:
    ports, held = _free_run(2)
    try:
        with pytest.raises(OSError) as err:
            gloo_ports.hold_port(ports)
    finally:
        for sock in held:
            sock.close()
    assert err.value.errno == errno.EADDRINUSE
    assert err.value.strerror == (
        f"every port of {ports[0]}-{ports[-1]} (FASTDEPLOY_PATCH_GLOO_PORTS) is taken on this host"
    )


def test_a_port_that_cannot_be_bound_for_another_reason_is_not_skipped() -> None:
    with (
        mock.patch.object(gloo_ports, "_bind", side_effect=OSError(errno.EADDRNOTAVAIL, "no such address")),
        pytest.raises(OSError, match="no such address"),
    ):
        gloo_ports.hold_port(range(29500, 29510))


def test_a_socket_that_fails_to_bind_is_closed() -> None:
    sockets: list[socket.socket] = []
    real = socket.socket

    def recording(*args: object) -> socket.socket:
        sockets.append(real(*args))
        return sockets[-1]

    with (
        gloo_ports.hold_port(None) as hold,
        mock.patch.object(gloo_ports.socket, "socket", side_effect=recording),
        pytest.raises(OSError),
    ):
        gloo_ports._bind(hold.getsockname()[1])
    assert sockets[0].fileno() == -1


# --- the global store's port ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "port"),
    [
        ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6001", "PADDLE_MASTER": "10.0.0.2:6002"}, 6001),
        ({"MASTER_ADDR": "10.0.0.1", "PADDLE_MASTER": "10.0.0.2:6002"}, 6002),
        ({"PADDLE_TRAINER_ENDPOINTS": "10.0.0.3:6003,10.0.0.4:6004"}, 6003),
        ({}, None),
        ({"PADDLE_MASTER": "somewhere"}, None),
    ],
)
def test_the_global_stores_port_is_found_as_paddle_finds_it(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], port: int | None
) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "PADDLE_MASTER", "PADDLE_TRAINER_ENDPOINTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rendezvous.global_store_port() == port


@pytest.mark.parametrize("port", [6170, None])
def test_the_first_creation_turns_nagle_off_on_the_global_store_once(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, port: int | None
) -> None:
    monkeypatch.setattr(api, "_store_without_delay", False)
    world.answer(1, 1)
    world.answer(2, 1)
    with (
        mock.patch.object(rendezvous, "global_store_port", return_value=port),
        mock.patch.object(api, "store_without_delay") as nodelay,
    ):
        new_signal_group().close()
        new_signal_group().close()
    assert nodelay.call_args_list == ([mock.call(port)] if port else [])


# --- a failed creation refuses every later one -----------------------------------------------------------------


def test_after_a_failed_creation_every_later_one_raises_at_once_and_tells_the_others(world: FakeWorld) -> None:
    world.global_store.peers_done = 0
    with (
        mock.patch.object(rendezvous, "arrive", side_effect=TimeoutError("ranks [1] never arrived")),
        pytest.raises(TimeoutError),
    ):
        new_signal_group(transport="shm", create_timeout=5)
    world.global_store.sets.clear()
    world.global_store.gets.clear()
    world.global_store.adds.clear()
    for number in (2, 3):
        with pytest.raises(SignalGroupError) as err:
            new_signal_group(transport="gloo", create_timeout=600)
        assert str(err.value) == (
            f"creating signal group #{number} (ranks [0, 1]) on rank 0 cannot start: creation #1 failed on this rank "
            f"(TimeoutError: ranks [1] never arrived), so the ranks of this world are out of step; {RESTART}"
        )
    # It read nothing, of this creation or another; it published why under each later creation's own keys.
    assert world.global_store.gets == []
    assert [key for key, _ in world.global_store.sets] == [
        "fastdeploy_patch/signal_group/2/failure",
        "fastdeploy_patch/signal_group/3/failure",
    ]
    assert json.loads(world.global_store.sets[0][1])["reason"].startswith(
        "SignalGroupError: creating signal group #2 (ranks [0, 1]) on rank 0 cannot start: creation #1 failed"
    )
    assert world.new_group_calls == []


def test_an_interrupted_creation_also_refuses_the_next(world: FakeWorld) -> None:
    with (
        mock.patch.object(rendezvous, "negotiate_shm", side_effect=KeyboardInterrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        new_signal_group()
    with pytest.raises(SignalGroupError, match=r"creation #1 failed on this rank \(KeyboardInterrupt: \)"):
        new_signal_group()


def test_a_refusal_every_rank_agreed_on_keeps_the_world_in_step(world: FakeWorld) -> None:
    world.answer(1, 1, CANNOT)
    with pytest.raises(ValueError, match=r"transport='auto' falls back to gloo, whose ops fail after a fixed 30 s"):
        new_signal_group(timeout=45)
    # Not published as a failure, and the next creation goes ahead.
    assert "fastdeploy_patch/signal_group/1/failure" not in world.global_store.values
    assert api._failed is None
    world.answer(2, 1)
    with new_signal_group() as group:
        assert group.transport == "shm"


def test_a_bad_port_range_is_refused_before_any_communication(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTDEPLOY_PATCH_GLOO_PORTS", "29599-29500")
    with pytest.raises(ValueError, match=r"^FASTDEPLOY_PATCH_GLOO_PORTS must be LOW-HIGH"):
        new_signal_group(transport="gloo")
    assert world.global_store.adds == [] and api._created == 0


@pytest.mark.parametrize("create_timeout", [0, "5", None])
def test_a_bad_create_timeout_is_refused_before_any_communication(world: FakeWorld, create_timeout: object) -> None:
    with pytest.raises((TypeError, ValueError), match=r"^create_timeout must be"):
        new_signal_group(create_timeout=create_timeout)
    assert world.global_store.adds == [] and api._created == 0


def test_the_port_range_reaches_the_port_hold(world: FakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTDEPLOY_PATCH_GLOO_PORTS", "29500-29509")
    new_signal_group(transport="gloo").close()
    world.free_port.assert_called_once_with(range(29500, 29510))


def test_create_timeout_defaults_to_the_rendezvous_timeout(world: FakeWorld) -> None:
    made: list[Creation] = []
    real = api.Creation

    def recording(*args: object, **kwargs: object) -> Creation:
        made.append(real(*args, **kwargs))
        return made[-1]

    world.answer(1, 1)
    world.answer(2, 1)
    with mock.patch.object(api, "Creation", side_effect=recording):
        new_signal_group().close()
        new_signal_group(create_timeout=datetime.timedelta(seconds=7)).close()
    assert [creation.timeout for creation in made] == [rendezvous.RENDEZVOUS_TIMEOUT_S, 7.0]
    assert rendezvous.RENDEZVOUS_TIMEOUT_S == 300
