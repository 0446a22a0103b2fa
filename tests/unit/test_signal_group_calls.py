"""Calls that end early, on real segments: an exception raised at every line of a call (``sys.settrace``) and the
call made again, a timeout and its retry, the first published value standing, ``timeout=None`` with its warnings,
a peer that cannot be judged, a second thread, a forked child.

Two members of one group live in this one process, each with its own mapping of the segment, as in
``test_signal_group_shm``; the src of a call is called first, so that nobody waits unless a test wants it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from unittest import mock

import pytest

from fastdeploy_patch.signal_group import (
    SignalGroup,
    SignalGroupError,
    broadcast_signal,
    group,
    shm_layout,
    shm_transport,
    waiting,
)
from fastdeploy_patch.signal_group.shm_layout import PIDNS_AT, SHM_RING_SLOTS, member_word, ring_at
from fastdeploy_patch.signal_group.shm_segment import ShmRing
from fastdeploy_patch.signal_group.shm_transport import ShmTransport
from tests.unit.shm_calls import Injected, source_line, traced

INITIAL = -7
RANKS = (0, 5)
CALL_FILES = {group.__file__, shm_transport.__file__, shm_layout.__file__, waiting.__file__}
"""Where a call runs: ``broadcast_signal`` and ``SignalGroup._broadcast``, the transport, the layout's helpers, the
wait loop."""

STEPS = [(10, 0), (11, 0), (12, 5), (13, 5), (14, 0), (15, 5), (16, 0)]
"""(value, src) of each call: the src changes, so that a reader of call m must look up call m's own src."""


@pytest.fixture
def pair() -> Iterator[tuple[ShmRing, ShmRing]]:
    creator = ShmRing.create(list(RANKS))
    other = ShmRing.attach(creator.handle, 5)
    yield creator, other
    other.close()
    creator.close()


def _groups(
    pair: tuple[ShmRing, ShmRing], *, lookahead: int = 0, timeout: float | None = 2.0
) -> dict[int, SignalGroup]:
    return {
        rank: SignalGroup(
            transport="shm",
            ranks=list(RANKS),
            rank=rank,
            timeout=timeout,
            lookahead=lookahead,
            endpoint=ShmTransport(ring, rank, timeout=timeout, lookahead=lookahead, initial=INITIAL),
        )
        for rank, ring in zip(RANKS, pair, strict=True)
    }


def _expected(lookahead: int) -> list[int]:
    values = [value for value, _ in STEPS]
    return [INITIAL] * lookahead + values[: len(values) - lookahead]


def _at_line_event(k: int | None) -> Callable[[FrameType], bool]:
    """True at the k-th line event it is asked about (never for None)."""
    count = [-1]

    def inject(frame: FrameType) -> bool:
        count[0] += 1
        return count[0] == k

    return inject


def _run(
    groups: dict[int, SignalGroup], target: tuple[int, int] | None = None, inject_at: int | None = None
) -> tuple[dict[int, list[int]], list[str], str | None]:
    """Make every call of STEPS on both members, the src first. The call ``target`` (step, rank) runs traced: with
    ``inject_at`` k, an ``Injected`` is raised at its k-th line, and the same call is then made again. Returns what
    each rank's calls returned (one value per step), the traced lines, and the line the exception was raised at."""
    got: dict[int, list[int]] = {rank: [] for rank in RANKS}
    lines: list[str] = []
    raised_at = None
    for step, (value, src) in enumerate(STEPS):
        for rank in sorted(RANKS, key=lambda r: r != src):
            # A reader's value is ignored: pass one that would show if it were not.
            mine = value if rank == src else 999

            def one_call(rank: int = rank, mine: int = mine, src: int = src) -> int:
                return broadcast_signal(mine, src=src, group=groups[rank])

            if (step, rank) != target:
                got[rank].append(one_call())
                continue
            inject = _at_line_event(inject_at)

            made = groups[rank]._calls
            try:
                lines, result = traced(one_call, CALL_FILES, inject)
            except Injected as injected:
                lines, raised_at = injected.lines, str(injected)
                if groups[rank]._calls != made:
                    # The call had finished: see test_an_exception_at_every_line_of_a_call_is_finished_by_the_next.
                    got[rank].append(None)
                    continue
                result = one_call()
            got[rank].append(result)
    return got, lines, raised_at


@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("target", [(0, 0), (2, 5), (2, 0), (3, 0), (6, 5)], ids=lambda t: f"step{t[0]}-rank{t[1]}")
def test_an_exception_at_every_line_of_a_call_is_finished_by_the_next(lookahead: int, target: tuple[int, int]) -> None:
    """Whatever line of a call (the group's, the transport's and their callees') an exception lands on, the next
    call on that rank finishes it and returns the value that call was waiting for, and every rank agrees with the
    src on every later call.

    One line is the exception: ``return value`` in ``SignalGroup._broadcast``, after the statement that commits the
    call. A line trace can raise there; a signal cannot (CPython runs signal handlers only at calls and backward
    jumps, and none runs between that store and the return), and neither can a second thread. The test checks that
    it is the only such line, and that the call is then simply complete."""
    creator = ShmRing.create(list(RANKS))
    other = ShmRing.attach(creator.handle, 5)
    try:
        got, clean_lines, _ = _run(_groups((creator, other), lookahead=lookahead), target)
    finally:
        other.close()
        creator.close()
    assert got == {rank: _expected(lookahead) for rank in RANKS}
    assert len(clean_lines) > 10
    completed = []
    for k in range(len(clean_lines)):
        creator = ShmRing.create(list(RANKS))
        other = ShmRing.attach(creator.handle, 5)
        try:
            got, _, raised_at = _run(_groups((creator, other), lookahead=lookahead), target, inject_at=k)
        finally:
            other.close()
            creator.close()
        assert raised_at == clean_lines[k]
        if None in got[target[1]]:
            completed.append(raised_at)
            got[target[1]][target[0]] = _expected(lookahead)[target[0]]
        assert got == {rank: _expected(lookahead) for rank in RANKS}, f"exception at {raised_at} (line {k})"
    assert len(completed) == 1 and completed[0].startswith("_broadcast:"), completed
    assert completed[0] == clean_lines[-1]


def _raise_once_at(text: str) -> Callable[[FrameType], bool]:
    """For ``traced``: raise at the first line in the call's code whose source is ``text``."""

    def inject(frame: FrameType) -> bool:
        return source_line(frame) == text

    return inject


def test_a_reader_that_took_its_value_then_was_interrupted_gets_it_even_after_the_slot_is_reused(
    pair: tuple[ShmRing, ShmRing],
) -> None:
    groups = _groups(pair)
    assert broadcast_signal(1, src=0, group=groups[0]) == 1
    with pytest.raises(Injected):
        traced(
            lambda: broadcast_signal(0, src=0, group=groups[5]),
            CALL_FILES,
            _raise_once_at("return slot_value(word)"),
        )
    # The cursor moved: the src may now fill the whole ring, slot 0 included.
    for value in range(2, SHM_RING_SLOTS + 2):
        broadcast_signal(value, src=0, group=groups[0])
    assert pair[0].words[ring_at(2) // 8] >> 32 == SHM_RING_SLOTS + 1
    assert [broadcast_signal(0, src=0, group=groups[5]) for _ in range(SHM_RING_SLOTS + 1)] == list(
        range(1, SHM_RING_SLOTS + 2)
    )


def test_a_src_interrupted_after_its_publish_keeps_the_first_value(pair: tuple[ShmRing, ShmRing]) -> None:
    groups = _groups(pair)
    with pytest.raises(Injected):
        traced(
            lambda: broadcast_signal(1, src=0, group=groups[0]),
            CALL_FILES,
            _raise_once_at("self._srcs[n & SLOT_MASK] = src"),
        )
    assert broadcast_signal(0, src=0, group=groups[5]) == 1
    assert broadcast_signal(2, src=0, group=groups[0]) == 1
    assert [broadcast_signal(3, src=0, group=groups[0]), broadcast_signal(0, src=0, group=groups[5])] == [3, 3]


def test_a_src_interrupted_before_its_publish_publishes_the_retrys_value(pair: tuple[ShmRing, ShmRing]) -> None:
    groups = _groups(pair)
    with pytest.raises(Injected):
        traced(
            lambda: broadcast_signal(1, src=0, group=groups[0]),
            CALL_FILES,
            _raise_once_at("words[self._slots[index]] = pack_slot(n, value)"),
        )
    assert pair[0].words[ring_at(2) // 8] == 0
    assert [broadcast_signal(2, src=0, group=groups[0]), broadcast_signal(0, src=0, group=groups[5])] == [2, 2]


def test_a_timeout_and_an_interrupt_while_waiting_are_finished_by_the_next_call_with_lookahead(
    pair: tuple[ShmRing, ShmRing],
) -> None:
    groups = _groups(pair, lookahead=1, timeout=0.05)
    assert broadcast_signal(0, src=5, group=groups[0]) == INITIAL
    with pytest.raises(TimeoutError, match=r"\(rank 5 has not published the value of call 0\); the group is still"):
        broadcast_signal(0, src=5, group=groups[0])
    with mock.patch.object(waiting.os, "sched_yield", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            broadcast_signal(0, src=5, group=groups[0])
    with pytest.raises(ValueError, match=r"src 0 is not the src of the call that ended early on this rank \(src 5\)"):
        broadcast_signal(0, src=0, group=groups[0])
    assert [broadcast_signal(7, src=5, group=groups[5]) for _ in range(2)] == [INITIAL, 7]
    assert broadcast_signal(0, src=5, group=groups[0]) == 7
    assert [broadcast_signal(8, src=0, group=groups[0]), broadcast_signal(0, src=0, group=groups[5])] == [7, 7]


def test_without_a_timeout_a_reader_waits_for_a_live_src_and_warns_naming_it(
    pair: tuple[ShmRing, ShmRing], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(waiting, "SLOW_PEER_WARNING_S", 0.1)
    monkeypatch.setattr(waiting, "SLOW_PEER_REPEAT_S", 0.2)
    groups = _groups(pair, timeout=None)
    assert groups[5].timeout is None and "timeout=None" in repr(groups[5])
    late_src = threading.Timer(0.75, lambda: broadcast_signal(4, src=0, group=groups[0]))
    with caplog.at_level(logging.WARNING, logger="fastdeploy_patch"):
        late_src.start()
        assert broadcast_signal(0, src=0, group=groups[5]) == 4
    late_src.join()
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastdeploy_patch"]
    assert len(warnings) >= 2, warnings
    assert warnings[0].startswith("signal group (ranks [0, 5]): rank 5 has waited 0 s for a broadcast from src 0 ")
    assert (
        "(rank 0 has not published the value of call 0); still waiting, as long as the peers are alive"
        in (warnings[0])
    )


def test_without_a_timeout_a_src_waits_for_room_and_warns_naming_the_readers_behind(
    pair: tuple[ShmRing, ShmRing], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(waiting, "SLOW_PEER_WARNING_S", 0.1)
    groups = _groups(pair, timeout=None)
    for value in range(SHM_RING_SLOTS):
        broadcast_signal(value, src=0, group=groups[0])
    late_reader = threading.Timer(0.4, lambda: broadcast_signal(0, src=0, group=groups[5]))
    with caplog.at_level(logging.WARNING, logger="fastdeploy_patch"):
        late_reader.start()
        assert broadcast_signal(64, src=0, group=groups[0]) == 64
    late_reader.join()
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastdeploy_patch"]
    assert warnings and "rank 0 has waited" in warnings[0]
    assert "(ranks [5] have not taken the value of call 0 yet)" in warnings[0]


def test_a_peer_that_cannot_be_judged_bounds_a_none_wait_and_the_timeout_can_be_retried(
    pair: tuple[ShmRing, ShmRing], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm_transport, "UNJUDGED_TIMEOUT_S", 0.1)
    # The src looks as if it lived in another PID namespace: its exit could never be seen from here.
    pair[0].words[member_word(0, PIDNS_AT)] += 1
    groups = _groups(pair, timeout=None)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        broadcast_signal(0, src=0, group=groups[5])
    assert 0.1 <= time.monotonic() - started < 5
    assert "(timeout 0.1 s): a peer is slow or stuck (rank 0 has not published the value of call 0); whether it " in (
        str(err.value)
    )
    assert "cannot be judged from here (another PID namespace, or no readable /proc), so timeout=None waits 0.1 s" in (
        str(err.value)
    )
    assert broadcast_signal(6, src=0, group=groups[0]) == 6
    assert broadcast_signal(0, src=0, group=groups[5]) == 6


def test_a_second_thread_calling_during_a_call_gets_a_runtime_error_and_the_call_goes_on(
    pair: tuple[ShmRing, ShmRing],
) -> None:
    groups = _groups(pair, timeout=10)
    taken: list[int] = []
    reader = threading.Thread(target=lambda: taken.append(broadcast_signal(0, src=0, group=groups[5])))
    reader.start()
    deadline = time.monotonic() + 10
    while groups[5]._state is None and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(RuntimeError) as err:
        broadcast_signal(0, src=0, group=groups[5])
    assert str(err.value) == (
        "a broadcast on the signal group (ranks [0, 5]) is already running in this process (another thread, or a "
        "signal handler that interrupted it): calls on one group must not overlap"
    )
    assert broadcast_signal(3, src=0, group=groups[0]) == 3
    reader.join(10)
    assert taken == [3]
    # Refused before it touched anything: the next call is call 1 on both ranks.
    assert [broadcast_signal(4, src=0, group=groups[0]), broadcast_signal(0, src=0, group=groups[5])] == [4, 4]


def test_a_forked_child_is_refused_at_once_and_touches_nothing_shared(pair: tuple[ShmRing, ShmRing]) -> None:
    groups = _groups(pair)
    assert [broadcast_signal(1, src=0, group=groups[0]), broadcast_signal(0, src=0, group=groups[5])] == [1, 1]
    before = bytes(pair[0].words.cast("B"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and never returns
        outcome = b""
        try:
            for rank, value in ((0, 2), (5, 0)):
                try:
                    broadcast_signal(value, src=0, group=groups[rank])
                    outcome += b"returned;"
                except SignalGroupError as exc:
                    outcome += str(exc).encode() + b";"
            groups[5].close()
            outcome += b"closed" if groups[5].closed else b"open"
        finally:
            os.write(write, outcome)
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0
    refusal = (
        f"the signal group (ranks [0, 5]) was created by process {os.getpid()}, not by this one ({pid}): a forked "
        "child must not call broadcast_signal() on its parent's group (it would take the parent's values); only "
        "the process that created a group may use it"
    )
    assert reported == f"{refusal};{refusal};closed"
    assert bytes(pair[0].words.cast("B")) == before
    assert [broadcast_signal(2, src=0, group=groups[0]), broadcast_signal(0, src=0, group=groups[5])] == [2, 2]


def test_the_at_fork_hook_marks_every_live_group_and_a_marked_group_closes_without_touching_its_end(
    pair: tuple[ShmRing, ShmRing], monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _groups(pair)
    assert set(groups.values()) <= set(group._live_groups)
    # Only this test's groups, so that no other group of this process is marked.
    monkeypatch.setattr(group, "_live_groups", weakref.WeakSet(groups.values()))
    # What os.register_at_fork runs in a child, run here so that this process's coverage sees it.
    group._mark_forked()
    assert groups[5]._state == group._FORKED
    with pytest.raises(SignalGroupError) as err:
        broadcast_signal(1, src=0, group=groups[0])
    assert str(err.value).startswith(
        f"the signal group (ranks [0, 5]) was created by process {os.getppid()}, not by this one ({os.getpid()})"
    )
    assert pair[0].words[ring_at(2) // 8] == 0
    with mock.patch.object(groups[0]._endpoint, "close") as close:
        groups[0].close()
    close.assert_not_called()
    assert groups[0].closed
    with pytest.raises(SignalGroupError, match=r"is unusable: it was closed; every rank must create a new group"):
        broadcast_signal(1, src=0, group=groups[0])
