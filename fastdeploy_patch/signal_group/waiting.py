"""The one way the shared-memory transport waits: spin, then yield, then sleep, until a deadline.

The writer (waiting for ring room) and the readers (waiting for a value) both wait here. A waiter first spins,
because a partner that is running answers within microseconds; then it yields its core, because with more ranks
than cores (4 ranks on 2 cores here) the partner may need this very core to make progress; then it sleeps, so
that a rank left waiting (the engine idle, a slow peer) does not burn a core: the top complaint filed against
vLLM's and SGLang's shared-memory queues (vLLM #19036, SGLang #1730, #3708).

How it sleeps: a waiter given a ``park`` function (a reader, on Linux: a futex wait on the slot it waits for, see
``futex``) sleeps in it, and the src's publish wakes it: first for at most ``FUTEX_FIRST_WAIT_S``, the only sleep
that can miss its wake-up, then until its next liveness check. Without one (the writer waiting for room, or no
futex here) it sleeps with a doubling interval capped at ``SLEEP_CAP_S``, so a value is seen up to about 1 ms late.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

from fastdeploy_patch.signal_group import futex

SPIN_S = 20e-6
"""Busy polling first. A Python round trip through shared memory takes about 1.5 us at p50 here, so a partner
that is on a core answers well inside this."""

YIELD_S = 100e-6
"""Then ``os.sched_yield()`` between polls (about 0.3 us each, vLLM #9994): a partner that shares our core gets
it at once. Every wait longer than ``SPIN_S + YIELD_S`` runs at full CPU for that long, so this bounds a reader's
CPU share when values come 2 ms apart to about 6%; it was 1 ms (28.5% of a core measured at 2 ms) before the
futex phase made sleeping cheap to wake from.

Chosen by a sweep with ``fastdeploy-patch bench --src-late D --iters 1000`` (2 ranks, one run each, load 3.8-6.2
from other jobs on the 2 cores): yield 50 / 100 / 200 us gave shm wake p50 48 / 53 / 50 us and reader CPU
7.6 / 7.3 / 6.8% at D = 2 ms, 60 / 69 / 66 us and 3.5 / 3.6 / 3.3% at 5 ms, 26 / 29 / 32 us and 25 / 23 / 15% at
0.3 ms: within the noise of each other. 100 us keeps the CPU bound at 2 ms near 6% while a partner that needs
our core still gets it; with it, at load 0.5-1.6, three runs gave wake p50 23-53 us, p90 63-100 us and CPU
7.2-8.1% at 2 ms, and p50 38-47 us, p90 174-203 us, CPU 3.2-3.6% at 5 ms (sleep phase before: p50 661 and
967 us)."""

SLEEP_FIRST_S = 20e-6
"""The first capped sleep once yielding stops; each later sleep doubles, up to ``SLEEP_CAP_S``. (``time.sleep``
of less than about 50 us really sleeps about 50 us on Linux.)"""

SLEEP_CAP_S = 1e-3
"""The longest capped sleep: a value published after a long wait is seen at most about 1 ms late, and a waiting
rank wakes about 1,000 times a second, a few microseconds of CPU each (about 1% of a core, measured in the tests'
idle-CPU check)."""

FUTEX_FIRST_WAIT_S = 1e-3
"""The first futex sleep of a wait. It alone can miss its wake-up: the src may load the reader's announcement before
its own publishing store is visible, while the reader, having just announced, still sees the old slot and sleeps
(see ``futex``). It is also the longest a lost wake-up costs: every later sleep of the wait starts after an
announcement that the kernel's futex barrier has made visible, so the src's publish wakes it. (It was 10 ms for
every sleep before.) Later sleeps last until the next liveness check, so an idle reader wakes about
``1 / PARKED_LIVENESS_INTERVAL_S`` times a second."""

LIVENESS_INTERVAL_S = 0.05
"""How often a waiter looks for dead peers, and a src at most how often it looks at its readers: a peer that
exited is reported well within 1 s."""

PARKED_LIVENESS_INTERVAL_S = 0.1
"""How often a waiter that parks looks for dead peers after its first look (at ``LIVENESS_INTERVAL_S``). A parked
waiter wakes only for a publish or for that look, and each look after a sleep runs from cold caches. Measured here
with ``bench --src-late 1000`` (the reader's whole process, two runs each): looks every 50 ms cost 1.6-2.2% of a
core, every 100 ms 1.3-1.5%, against 0.8-1.0% for the floor's reader, which never looks. Every 250 ms cost less
still, but the wake after 300 ms grew from 0.8-1.0x to 1.3-1.4x the floor's: a CPU idle longer wakes slower here.
At 10 looks a second a peer that exited is still reported well within 1 s."""


SLOW_PEER_WARNING_S = 30.0
"""A waiter that has waited this long (a reader for its value, a src for room) logs a warning naming whom it waits
for: with ``timeout=None`` a slow peer is not a failure, but an operator must be able to see the wait."""

SLOW_PEER_REPEAT_S = 60.0
"""After the first warning, a waiter that still waits warns again this often (as vLLM's message queue does)."""


def wait_until(
    ready: Callable[[], bool],
    timeout: float | None,
    find_lost: Callable[[], BaseException | None],
    park: Callable[[float], object] | None = None,
    warn: Callable[[float], object] | None = None,
) -> bool:
    """Wait until ``ready()`` is true; return True then, or False once ``timeout`` seconds have passed (never, for
    None: only ``find_lost`` ends such a wait).

    Every ``LIVENESS_INTERVAL_S`` (``PARKED_LIVENESS_INTERVAL_S`` once it has parked) it calls ``find_lost()``,
    which returns the error to raise when a peer that the wait depends on is gone. ``ready()`` is asked once more
    before that error is raised, so a peer that published what we need and then exited never fails the wait. After
    the spin and yield phases it calls ``park(seconds)`` when given, which may sleep up to ``seconds`` (at most
    ``FUTEX_FIRST_WAIT_S`` the first time, then until the next liveness check; never past the deadline) and must
    return early once ``ready()`` may have become true; without it, it sleeps in capped steps. ``warn(waited)`` is
    called once ``SLOW_PEER_WARNING_S`` have passed, then every ``SLOW_PEER_REPEAT_S``, at a liveness check.
    """
    start = time.monotonic()
    deadline = math.inf if timeout is None else start + timeout
    next_check = start + LIVENESS_INTERVAL_S
    next_warning = start + SLOW_PEER_WARNING_S
    sleep = SLEEP_FIRST_S
    first_park = True
    while not ready():
        now = time.monotonic()
        if now >= next_check:
            lost = find_lost()
            if lost is not None:
                if ready():
                    return True
                raise lost
            next_check = now + (LIVENESS_INTERVAL_S if first_park else PARKED_LIVENESS_INTERVAL_S)
            if now >= next_warning and warn is not None:
                next_warning = now + SLOW_PEER_REPEAT_S
                warn(now - start)
        if now >= deadline:
            return ready()
        waited = now - start
        if waited < SPIN_S:
            continue
        if waited < SPIN_S + YIELD_S:
            os.sched_yield()
            continue
        if park is not None:
            seconds = min(next_check, deadline) - now
            if first_park:
                seconds = min(seconds, FUTEX_FIRST_WAIT_S)
                first_park = False
            park(seconds)
            continue
        time.sleep(min(sleep, deadline - now))
        sleep = min(2 * sleep, SLEEP_CAP_S)
    return True


def shm_reader_sleep() -> tuple[str, str]:
    """How a shared-memory reader sleeps once it has spun and yielded, here: ``("futex", what)`` when futex waits
    work in this process, else ``("capped sleep", why not)``, in which case a value is seen up to about 1 ms
    late."""
    support = futex.available()
    return ("futex" if support.futex is not None else "capped sleep", support.reason)
