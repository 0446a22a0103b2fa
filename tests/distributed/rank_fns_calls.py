"""What each real rank runs in ``test_signal_group_calls``: a src busy past the warning, calls that end early
(their timeout, a signal handler's exception) and are made again, a forked child, a second thread. Each function
returns a JSON-able report and closes its group; it restores every process-wide setting it changed (a signal
handler, a timer, a logging handler), because pool ranks outlive the call.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import paddle.distributed as dist

from fastdeploy_patch.signal_group import SignalGroupError, broadcast_signal, new_signal_group


class _Records(logging.Handler):
    """Keeps the messages logged on the ``fastdeploy_patch`` logger, with when they came."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((time.monotonic(), record.getMessage()))


def busy_src(*, busy_s: float, steps: int) -> dict:
    """With every default (``timeout=None``, the 30 s warning): rank 0 publishes ``steps`` values, the second after
    ``busy_s`` of work; the others wait for it, and report what they got, how long the wait took and the warnings
    they logged meanwhile, with their times from the start of the wait."""
    rank = dist.get_rank()
    group = new_signal_group()
    records = _Records()
    logger = logging.getLogger("fastdeploy_patch")
    logger.addHandler(records)
    try:
        got = [broadcast_signal(100, src=0, group=group)]
        if rank == 0:
            time.sleep(busy_s)
        started = time.monotonic()
        got += [broadcast_signal(100 + step, src=0, group=group) for step in range(1, steps)]
        waited = time.monotonic() - started
    finally:
        logger.removeHandler(records)
        group.close()
    return {
        "rank": rank,
        "got": got,
        "timeout": group.timeout,
        "waited": waited,
        "warnings": [(at - started, message) for at, message in records.seen],
    }


def timeout_then_retry(*, late_s: float, timeout: float, lookahead: int, steps: int) -> dict:
    """Readers with a short ``timeout``; the src (rank 0) is ``late_s`` late with call 3. Each reader makes every
    call again until it returns, and reports its values and how many ``TimeoutError`` it got; the values must be the
    stream's, shifted by the lookahead."""
    rank = dist.get_rank()
    group = new_signal_group(timeout=timeout, lookahead=lookahead, initial=-1)
    got, timeouts, messages = [], 0, []
    try:
        for step in range(steps):
            if rank == 0 and step == 3:
                time.sleep(late_s)
            while True:
                try:
                    got.append(broadcast_signal(1000 + step, src=0, group=group))
                    break
                except TimeoutError as exc:
                    timeouts += 1
                    messages.append(str(exc))
    finally:
        group.close()
    return {"rank": rank, "got": got, "timeouts": timeouts, "messages": messages[:1]}


class Alarm(Exception):
    """What the test's SIGALRM handler raises: an alarm-based step timeout, as a serving loop may have."""


# Whether the alarm may end the call now: set after the timer is armed, cleared by the store right after the call
# returns (no call runs between the two, so no handler can run there), so that a late alarm never ends a call that
# had returned.
_armed = [False]


def _alarm(signum: int, frame: object) -> None:
    if _armed[0]:
        _armed[0] = False
        raise Alarm("step timeout")


def alarm_then_retry(*, late_s: float, alarm_s: float, lookahead: int, steps: int) -> dict:
    """The src (the last rank) is ``late_s`` late with every fifth call; the other ranks arm a SIGALRM of ``alarm_s``
    before each call, whose handler raises ``Alarm`` while they wait, and make the call again after each. Reports the
    values each rank got and how many alarms ended a call."""
    rank, nranks = dist.get_rank(), dist.get_world_size()
    src = nranks - 1
    group = new_signal_group(lookahead=lookahead, initial=-1)
    before = signal.signal(signal.SIGALRM, _alarm)
    got, alarms = [], 0
    try:
        for step in range(steps):
            if rank == src and step % 5 == 4:
                time.sleep(late_s)
            while True:
                if rank != src:
                    signal.setitimer(signal.ITIMER_REAL, alarm_s)
                    _armed[0] = True
                try:
                    value = broadcast_signal(step * 7 + 1, src=src, group=group)
                    _armed[0] = False
                except Alarm:
                    alarms += 1
                    continue
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                got.append(value)
                break
    finally:
        _armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        group.close()
    return {"rank": rank, "got": got, "alarms": alarms}


def forked_child(*, steps: int, fork_at: int) -> dict:
    """Rank 1 forks a child after ``fork_at`` calls; the child calls ``broadcast_signal`` on the inherited group
    (as a data-loader worker might) and reports what it got through a pipe. Every rank goes on to ``steps`` calls
    and reports its values."""
    rank = dist.get_rank()
    group = new_signal_group()
    got, child = [], None
    try:
        for step in range(steps):
            if rank == 1 and step == fork_at:
                child = _fork_and_call(group, step)
            got.append(broadcast_signal(step * 3, src=0, group=group))
    finally:
        group.close()
    return {"rank": rank, "got": got, "child": child}


def _fork_and_call(group: object, step: int) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "returned"
        try:
            started = time.monotonic()
            try:
                broadcast_signal(step * 3, src=0, group=group)
            except SignalGroupError as exc:
                outcome = f"{type(exc).__name__}: {exc} ({time.monotonic() - started:.3f} s)"
        finally:
            os.write(write, outcome.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return {"pid": pid, "parent": os.getpid(), "outcome": outcome, "exit": os.waitstatus_to_exitcode(status)}


def second_thread(*, late_s: float, steps: int) -> dict:
    """Rank 0 publishes its first value ``late_s`` late. Meanwhile each other rank waits for it on a thread and
    calls the same group from its main thread, which must be refused; then every rank makes ``steps`` more calls."""
    rank = dist.get_rank()
    group = new_signal_group()
    refused, first = None, []
    try:
        if rank == 0:
            time.sleep(late_s)
            first.append(broadcast_signal(5, src=0, group=group))
        else:
            waiter = threading.Thread(target=lambda: first.append(broadcast_signal(0, src=0, group=group)))
            waiter.start()
            deadline = time.monotonic() + late_s / 2
            while group._state is None and time.monotonic() < deadline:
                time.sleep(0.001)
            try:
                broadcast_signal(0, src=0, group=group)
            except RuntimeError as exc:
                refused = str(exc)
            waiter.join(60)
        got = [broadcast_signal(step, src=0, group=group) for step in range(steps)]
    finally:
        group.close()
    return {"rank": rank, "first": first, "refused": refused, "got": got}
