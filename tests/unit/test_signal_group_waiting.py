"""The one wait loop (spin, yield, capped sleep, liveness checks, deadline) on a fake clock, and the liveness
verdicts from /proc on real and fake processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.signal_group import futex, liveness, waiting
from fastdeploy_patch.signal_group.liveness import ProcessIdentity, gone_reason, this_process
from fastdeploy_patch.signal_group.waiting import wait_until

from .zombies import wait_until_a_zombie


@dataclass
class Clock:
    """time.monotonic, time.sleep and os.sched_yield for the wait loop: every poll advances ``tick`` seconds."""

    now: float = 100.0
    tick: float = 5e-6
    sleeps: list[float] = field(default_factory=list)
    yields: int = 0

    def monotonic(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def sched_yield(self) -> None:
        self.yields += 1


@pytest.fixture
def clock() -> Iterator[Clock]:
    fake = Clock()
    with (
        mock.patch.object(waiting.time, "monotonic", fake.monotonic),
        mock.patch.object(waiting.time, "sleep", fake.sleep),
        mock.patch.object(waiting.os, "sched_yield", fake.sched_yield),
    ):
        yield fake


@pytest.fixture
def scripted() -> Iterator[list[object]]:
    """time.monotonic answers the times in the list in turn (from 0.0, so that a difference is exact); every other
    call of the loop is recorded there by name."""
    times = [0.0]
    calls: list[object] = [times]

    def monotonic() -> float:
        now = times.pop(0)
        calls.append(now)
        return now

    with (
        mock.patch.object(waiting.time, "monotonic", monotonic),
        mock.patch.object(waiting.time, "sleep", lambda seconds: calls.append("sleep")),
        mock.patch.object(waiting.os, "sched_yield", lambda: calls.append("yield")),
    ):
        yield calls


def _answers(*values: bool):
    answers = list(values)
    return lambda: answers.pop(0)


def test_each_phase_starts_exactly_at_its_boundary(scripted: list[object]) -> None:
    scripted[0].extend([waiting.SPIN_S, waiting.SPIN_S + waiting.YIELD_S])
    assert wait_until(_answers(False, False, True), 1.0, lambda: None) is True
    # Spinning ends at SPIN_S, yielding at SPIN_S + YIELD_S.
    assert scripted[1:] == [0.0, waiting.SPIN_S, "yield", waiting.SPIN_S + waiting.YIELD_S, "sleep"]


def test_the_liveness_check_runs_exactly_at_its_interval(scripted: list[object]) -> None:
    scripted[0].append(waiting.LIVENESS_INTERVAL_S)
    lost = mock.Mock(return_value=None)
    assert wait_until(_answers(False, True), 1.0, lost) is True
    lost.assert_called_once_with()
    assert scripted[1:] == [0.0, waiting.LIVENESS_INTERVAL_S, "sleep"]


def test_the_deadline_ends_the_wait_exactly_when_it_is_reached(scripted: list[object]) -> None:
    scripted[0].append(0.01)
    assert wait_until(_answers(False, False), 0.01, lambda: None) is False
    assert scripted[1:] == [0.0, 0.01]


def _until(clock: Clock, at: float):
    return lambda: clock.now >= at


def test_a_condition_already_met_returns_at_once(clock: Clock) -> None:
    lost = mock.Mock()
    assert wait_until(lambda: True, 1.0, lost) is True
    assert (clock.sleeps, clock.yields) == ([], 0)
    lost.assert_not_called()


def test_it_spins_then_yields_then_sleeps_doubling_up_to_the_cap(clock: Clock) -> None:
    start = clock.now
    assert wait_until(_until(clock, start + 0.02), 1.0, lambda: None) is True
    # SPIN_S of spinning, YIELD_S of yielding at 5 us a poll, then sleeps from SLEEP_FIRST_S, doubling, capped.
    assert abs(clock.yields - waiting.YIELD_S / clock.tick) <= 2
    doubled = [min(waiting.SLEEP_FIRST_S * 2**n, waiting.SLEEP_CAP_S) for n in range(len(clock.sleeps))]
    assert clock.sleeps == pytest.approx(doubled)
    assert clock.sleeps[-1] == waiting.SLEEP_CAP_S


def test_peers_are_checked_every_liveness_interval_while_waiting(clock: Clock) -> None:
    checks: list[float] = []

    def lost() -> None:
        checks.append(clock.now)

    start = clock.now
    assert wait_until(_until(clock, start + 0.26), 1.0, lost) is True
    assert len(checks) == 5
    gaps = [b - a for a, b in zip([start, *checks], checks, strict=False)]
    assert all(0.05 <= gap < 0.052 for gap in gaps), gaps


def test_a_lost_peer_raises_what_the_check_returned(clock: Clock) -> None:
    error = RuntimeError("rank 1 is gone")
    with pytest.raises(RuntimeError) as err:
        wait_until(lambda: False, 10.0, lambda: error)
    assert err.value is error
    assert 0.05 <= clock.now - 100.0 < 0.06


def test_a_peer_that_published_before_it_exited_fails_nobody(clock: Clock) -> None:
    answers = iter([False] * 100_000)
    published = []

    def ready() -> bool:
        return bool(published) or next(answers)

    def lost() -> RuntimeError:
        # The value lands between the last poll and the liveness verdict.
        published.append(True)
        return RuntimeError("rank 1 is gone")

    assert wait_until(ready, 10.0, lost) is True


def test_the_deadline_returns_false_and_never_sleeps_past_it(clock: Clock) -> None:
    start = clock.now
    assert wait_until(lambda: False, 0.0123, lambda: None) is False
    assert 0.0123 <= clock.now - start < 0.0124
    assert clock.sleeps[-1] < 1e-3


def test_a_value_arriving_at_the_deadline_still_counts(clock: Clock) -> None:
    start = clock.now
    assert wait_until(_until(clock, start + 0.0123), 0.0123, lambda: None) is True


@dataclass
class Parking:
    """A ``park`` function on the fake clock: each call sleeps the whole slice it is given (a futex timeout)."""

    clock: Clock
    slices: list[tuple[float, float]] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.slices.append((self.clock.now, seconds))
        self.clock.now += seconds


def test_a_parking_waiter_spins_yields_then_parks_in_bounded_slices_and_never_sleeps(clock: Clock) -> None:
    park = Parking(clock)
    start = clock.now
    checks: list[float] = []
    first_check, later_checks = waiting.LIVENESS_INTERVAL_S, waiting.PARKED_LIVENESS_INTERVAL_S
    ready_at = first_check + 2.5 * later_checks
    assert wait_until(_until(clock, start + ready_at), 10.0, lambda: checks.append(clock.now), park) is True
    assert clock.sleeps == [] and 18 <= clock.yields <= 21
    (first_at, first), (second_at, second), *_ = park.slices
    assert waiting.SPIN_S + waiting.YIELD_S <= first_at - start < waiting.SPIN_S + waiting.YIELD_S + 2e-5
    # The first slice is short (a lost wake-up costs at most that); every later one lasts until the next liveness
    # check: the first at LIVENESS_INTERVAL_S, then one every PARKED_LIVENESS_INTERVAL_S.
    assert first == pytest.approx(waiting.FUTEX_FIRST_WAIT_S)
    assert second_at + second == pytest.approx(start + waiting.LIVENESS_INTERVAL_S, abs=1e-5)
    ends = [round(at + seconds - start, 4) for at, seconds in park.slices[1:]]
    assert ends == [round(first_check + k * later_checks, 4) for k in range(4)]
    gaps = [b - a for a, b in zip([start, *checks], checks, strict=False)]
    assert [round(gap, 4) for gap in gaps] == [first_check, later_checks, later_checks]


def test_a_wake_up_lost_at_the_first_park_costs_at_most_the_first_slice(clock: Clock) -> None:
    """Every park sleeps its whole slice here (no wake-up ever arrives): a value that lands right after the waiter
    announced itself is still seen within FUTEX_FIRST_WAIT_S of its first park."""
    park = Parking(clock)
    published: list[float] = []

    def ready() -> bool:
        if park.slices and not published:
            # Published as the first park began.
            published.append(park.slices[0][0])
        return bool(published) and clock.now > published[0]

    assert wait_until(ready, 1.0, lambda: None, park) is True
    assert len(park.slices) == 1
    assert clock.now - published[0] <= waiting.FUTEX_FIRST_WAIT_S + 1e-5


def test_a_first_park_near_the_deadline_or_the_liveness_check_is_cut_short(clock: Clock) -> None:
    park = Parking(clock)
    start = clock.now
    assert wait_until(lambda: False, 0.0005, lambda: None, park) is False
    (at, seconds), *_ = park.slices
    assert at + seconds == pytest.approx(start + 0.0005, abs=1e-5)
    # Once yielding is over, the clock jumps to 0.4 ms before the liveness check: the first park stops there.
    park = Parking(clock)
    start = clock.now
    checks: list[float] = []

    def ready() -> bool:
        if clock.now - start >= waiting.SPIN_S + waiting.YIELD_S and not park.slices:
            clock.now = start + waiting.LIVENESS_INTERVAL_S - 0.0004
        return bool(checks)

    assert wait_until(ready, 1.0, lambda: checks.append(clock.now), park) is True
    (at, seconds), *_ = park.slices
    assert seconds < 0.0004 and at + seconds == pytest.approx(start + waiting.LIVENESS_INTERVAL_S, abs=1e-5)


def test_a_parking_waiter_never_parks_past_the_deadline(clock: Clock) -> None:
    park = Parking(clock)
    start = clock.now
    assert wait_until(lambda: False, 0.0234, lambda: None, park) is False
    at, seconds = park.slices[-1]
    assert at + seconds == pytest.approx(start + 0.0234, abs=2e-5)
    assert 0.0234 <= clock.now - start < 0.0235


def test_a_parking_waiter_looks_again_after_every_return_of_park(clock: Clock) -> None:
    """park may return early (woken, EAGAIN, EINTR): the condition is asked again each time."""
    returns = []
    ready_after = 3

    def park(seconds: float) -> None:
        returns.append(seconds)

    assert wait_until(lambda: len(returns) >= ready_after, 1.0, lambda: None, park) is True
    assert len(returns) == ready_after


@pytest.mark.parametrize(("works", "kind"), [(True, "futex"), (False, "capped sleep")])
def test_the_reader_sleep_in_use_is_named_with_its_reason(works: bool, kind: str) -> None:
    support = futex.Support(mock.Mock() if works else None, "the reason")
    with mock.patch.object(waiting.futex, "available", return_value=support):
        assert waiting.shm_reader_sleep() == (kind, "the reason")


def test_the_reader_sleep_here_is_futex() -> None:
    assert waiting.shm_reader_sleep() == (
        "futex",
        f"SYS_futex {futex.SYS_FUTEX[platform.machine()]} on {platform.machine()}",
    )


# --- liveness ---------------------------------------------------------------------------------------------


def test_this_process_is_named_by_pid_start_time_and_pid_namespace() -> None:
    me = this_process()
    assert me == ProcessIdentity(os.getpid(), procfs.stat("self").start_ticks, procfs.pid_namespace())
    assert me.start_ticks > 0 and me.pid_namespace > 0
    assert gone_reason(me) is None


def test_a_reaped_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    peer = ProcessIdentity(child.pid, 1, this_process().pid_namespace)
    assert gone_reason(peer) == f"process {child.pid} is gone"


def test_an_exited_process_not_yet_reaped_has_exited() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until_a_zombie(child.pid)
    start = procfs.stat(child.pid).start_ticks
    try:
        assert gone_reason(ProcessIdentity(child.pid, start, this_process().pid_namespace)) == (
            f"process {child.pid} has exited"
        )
    finally:
        child.wait()


def test_a_reused_pid_is_told_apart_by_its_start_time() -> None:
    me = this_process()
    peer = ProcessIdentity(me.pid, me.start_ticks + 1, me.pid_namespace)
    assert gone_reason(peer) == f"process {me.pid} is gone (its pid now belongs to another process)"


@pytest.mark.parametrize("namespace", ["other", "unknown"])
def test_a_peer_in_another_or_an_unknown_pid_namespace_is_never_judged(namespace: str) -> None:
    me = this_process()
    pid_namespace = me.pid_namespace + 1 if namespace == "other" else 0
    # Even a pid that is certainly not alive here: it may be a live process in its own namespace.
    assert gone_reason(ProcessIdentity(2**22 + 1, 5, pid_namespace)) is None


def test_without_a_readable_proc_this_process_is_never_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "PROC", "/nonexistent-proc")
    assert this_process() == ProcessIdentity(os.getpid(), 0, 0)
    assert gone_reason(this_process()) is None


def test_a_stat_of_this_process_that_cannot_be_read_leaves_it_unjudged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The PID namespace can be read, this process's stat cannot (a directory stands in its place).
    (tmp_path / str(os.getpid()) / "stat").mkdir(parents=True)
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "pid").write_text("")
    monkeypatch.setattr(liveness, "PROC", str(tmp_path))
    assert this_process() == ProcessIdentity(os.getpid(), 0, 0)


def test_a_command_name_with_spaces_and_parentheses_is_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    fields = ["S"] + [str(i) for i in range(4, 22)] + ["777", "0"]
    (tmp_path / "42" / "stat").write_text(f"42 (odd) name (x) {' '.join(fields)}\n")
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "pid").write_text("")
    monkeypatch.setattr(liveness, "PROC", str(tmp_path))
    here = os.stat(tmp_path / "self" / "ns" / "pid").st_ino
    assert gone_reason(ProcessIdentity(42, 777, here)) is None
    assert gone_reason(ProcessIdentity(42, 778, here)) == "process 42 is gone (its pid now belongs to another process)"


def test_without_a_timeout_it_waits_past_any_deadline_and_warns_on_schedule(clock: Clock) -> None:
    warnings: list[float] = []
    start = clock.now
    parks: list[float] = []

    def park(seconds: float) -> None:
        parks.append(seconds)
        clock.now += seconds

    assert wait_until(_until(clock, start + 200.0), None, lambda: None, park, warnings.append) is True
    # Each warning says how long this wait has lasted: first at 30 s, then 60 s apart; the checks run every 0.1 s.
    assert len(warnings) == 3
    assert [round(w) for w in warnings] == [30, 90, 150]
    assert all(0 <= w - expected < 0.11 for w, expected in zip(warnings, (30, 90, 150), strict=True))
    assert max(parks) <= waiting.PARKED_LIVENESS_INTERVAL_S + 1e-9


def test_a_wait_shorter_than_the_warning_threshold_never_warns(clock: Clock) -> None:
    warn = mock.Mock()
    assert wait_until(_until(clock, clock.now + 29.9), None, lambda: None, None, warn) is True
    warn.assert_not_called()


def test_a_timeout_still_bounds_a_wait_that_warns(clock: Clock) -> None:
    warnings: list[float] = []
    assert wait_until(lambda: False, 31.0, lambda: None, None, warnings.append) is False
    assert len(warnings) == 1 and 30.0 <= warnings[0] < 30.06


def test_a_peer_in_another_pid_namespace_or_unknown_cannot_be_judged() -> None:
    me = this_process()
    assert liveness.can_judge(me) is True
    assert liveness.can_judge(ProcessIdentity(me.pid, me.start_ticks, 0)) is False
    assert liveness.can_judge(ProcessIdentity(me.pid, me.start_ticks, me.pid_namespace + 1)) is False
