"""The shared-memory signal transport: the ring protocol over a segment that every member maps.

The segment's words are drawn in ``shm_layout``; the segment is made, attached and removed by ``shm_segment``.

Protocol, for call number n (counted from 0 on every member; every member makes the same calls). Each call is
two steps, in this order: the src publishes (``_publish``), then every member takes (``_take``).

- Publish, on the writer (the call's src) only. Room first: every member's cursor >= n - SHM_RING_SLOTS + 1, so
  the slot it is about to overwrite (call n - SHM_RING_SLOTS) has been consumed by all (one comparison on the fast
  path; a wait only when the ring is full). Then the store of slot n % SLOTS, then the wake of its sleepers.
  Nothing else runs before the store: no clock read, no ``/proc`` read, no bookkeeping, so that a reader waiting
  for this value gets it as soon as the src calls.
- Take, with lookahead d, on every member (the writer too): return the value of call m = n - d. Wait until slot
  m % SLOTS holds sequence_of(m), read the value, and set the cursor to m + 1. The first d calls return the
  group's initial value and consume nothing. A writer never waits for itself: its cursor is n - d and
  d <= SLOTS // 2.
- A reader that has waited past its spin and yield phases parks (see ``waiting`` and ``futex``): it stores m + 1
  at its PARKED_AT, looks at slot m once more, and sleeps in ``FUTEX_WAIT`` on the slot's sequence half
  (``SEQUENCE_HALF_AT``) while it still holds the sequence it saw. The writer, after storing slot n, calls
  ``FUTEX_WAKE`` on it only when some member's PARKED_AT holds n + 1: the fast path, where readers spin or yield,
  costs a load per member and no syscall. One announcement word per member, not a waiter count per group: each
  word has a single writer in its own cache line, so plain stores do (a shared count needs an atomic
  read-modify-write, which Python cannot do on shared memory, and one lost update would wake nobody, or everybody,
  forever), and it names the call the reader sleeps for, so a writer never wakes for a call nobody waits on.
- A waiter judges liveness only of the members it waits on (the src of call m, or the readers behind), and only
  while its condition is unmet: a src that published and then exited fails nobody. A member that finds a peer
  gone records it at BROKEN_AT, so that the other members fail fast instead of waiting for their timeout.
- Between the two steps, after its publish, the writer looks at its readers, at most every
  ``LIVENESS_INTERVAL_S`` (a clock read per call, ``/proc`` only then), so that a dead reader fails the src within
  a second instead of a ring (64 calls) later; the value it just published stays published for the live readers.
  A reader counts as lost only when it is gone and its cursor is not past the writer's own (and the writer has
  taken a value): it then made no more calls than the writer, so it can never make this one. A reader that made
  every call and exited (with a lookahead it may finish d calls before the writer) has a cursor past the
  writer's and fails nobody.

Calls that end early. The group numbers the calls and passes call n in; it counts a call as made only when the
call returns (``group``). A call that raised anywhere (a timeout, an interrupt, a signal handler's exception) is
made again as ``resume``, with the same n and src, and every step of ``broadcast`` may run twice: the src's entry
for call n and the cursor store write the same words again; the publish is skipped when slot n already holds call
n's sequence (the first value stands: a reader may have taken it); the take is skipped when the cursor already
moved past call m, and the word kept just before that store is returned (the writer may have reused the slot
since). Nothing of this runs before the src's publishing store on the fast path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastdeploy_patch.signal_group import futex, liveness, waiting
from fastdeploy_patch.signal_group.errors import SignalGroupError, lost_peer_message, stuck_peer_message
from fastdeploy_patch.signal_group.shm_layout import (
    BROKEN_AT,
    CURSOR_AT,
    PARKED_AT,
    SEQUENCE_HALF_AT,
    SHM_RING_SLOTS,
    SLOT_MASK,
    WORD_BYTES,
    member_word,
    pack_slot,
    sequence_of,
    slot_sequence,
    slot_value,
    slot_word,
)
from fastdeploy_patch.signal_group.shm_segment import ShmRing

logger = logging.getLogger("fastdeploy_patch")

UNJUDGED_TIMEOUT_S = 300.0
"""What ``timeout=None`` means for a wait on a peer whose liveness cannot be judged from here (another PID
namespace, no readable ``/proc``): such a peer could be gone for good, and nothing else would ever end the wait. The
``TimeoutError`` can be retried like any other."""


class ShmTransport:
    """One member's end of a shared-memory signal group: ``broadcast`` is the per-call protocol above."""

    def __init__(self, ring: ShmRing, rank: int, *, timeout: float | None, lookahead: int, initial: int) -> None:
        self.ring = ring
        self._ranks = list(ring.handle.ranks)
        self._members = len(self._ranks)
        self._words = ring.words
        self._timeout = timeout
        self._lookahead = lookahead
        self._initial = initial
        me = self._ranks.index(rank)
        self._rank = rank
        self._cursors = [member_word(i, CURSOR_AT) for i in range(self._members)]
        self._my_cursor = self._cursors[me]
        self._others = [i for i in range(self._members) if i != me]
        self._announcements = [member_word(i, PARKED_AT) for i in range(self._members)]
        self._my_parked = self._announcements[me]
        self._futex = futex.available().futex
        # The announcements a writer reads after each store; none without futex, where nobody parks.
        self._parked = [member_word(i, PARKED_AT) for i in self._others] if self._futex else []
        # The word index and the futex wake of each slot, by call % SHM_RING_SLOTS: made once, so that a publish
        # after an idle spell runs as few instructions as it can before its wake.
        self._slots = [slot_word(self._members, call) for call in range(SHM_RING_SLOTS)]
        self._wakers = [self._futex.waker(self._sequence_address(at)) for at in self._slots] if self._futex else []
        # Whether each member's exit can be seen from here: a wait on one that cannot is bounded even with None.
        self._judgeable = [liveness.can_judge(ring.identity(i)) for i in range(self._members)]
        # The src of each call still in the ring, by call % SHM_RING_SLOTS: a store that a retry of the same call
        # repeats harmlessly (lookahead <= SHM_RING_SLOTS // 2, so a call's entry outlives its take).
        self._srcs = [0] * SHM_RING_SLOTS
        # The slot word this member took last: a retry of a call whose take had already moved the cursor (so the
        # writer may have reused the slot) returns it.
        self._taken = 0
        # The writer may publish every call up to this one without looking at the cursors again.
        self._room_until = SHM_RING_SLOTS - 1
        self._next_reader_check = 0.0

    def broadcast(self, value: int | None, src: int, n: int) -> int:
        """Publish ``value`` (on src; None elsewhere) as call ``n``'s value and return call n - lookahead's.

        Every step may be repeated by a retry (``resume``) of the same call: the src's entry and the cursor store
        write the same words again, and the publish and the take are skipped by ``resume`` once done."""
        if value is not None:
            self._publish(n, value, src)
        self._srcs[n & SLOT_MASK] = src
        if value is not None:
            self._look_at_readers(n, src)
        return self._take(n - self._lookahead, src)

    def resume(self, value: int | None, src: int, n: int) -> int:
        """Finish call ``n``, which an earlier ``broadcast`` left at any point (an exception or a timeout), and
        return what that call would have returned. On the src, a value already published stays: ``value`` is then
        ignored."""
        m = n - self._lookahead
        words = self._words
        if m >= 0 and words[self._my_cursor] > m:
            # Taken already: the writer may have reused the slot since.
            return slot_value(self._taken)
        if value is not None and slot_sequence(words[self._slots[n & SLOT_MASK]]) == sequence_of(n):
            value = None
        return self.broadcast(value, src, n)

    def _publish(self, n: int, value: int, src: int) -> None:
        """Make ``value`` call ``n``'s, visible to every reader, and wake those asleep on it: room, store, wake,
        and nothing before them."""
        if n > self._room_until:
            self._make_room(n, src)
        words = self._words
        index = n & SLOT_MASK
        # The publishing store: sequence and value in one aligned 8-byte word, which x86-64 and AArch64 store
        # single-copy atomically, so a reader sees the old word or the new one whole and needs no fence. (The
        # cursor store that follows a reader's load depends on the loaded sequence, which orders the two.)
        words[self._slots[index]] = pack_slot(n, value)
        announced = n + 1
        for at in self._parked:
            if words[at] == announced:
                self._wakers[index]()
                break

    def _take(self, m: int, src: int) -> int:
        """Call ``m``'s value, once it is published (the group's initial value for m < 0); consumes it."""
        if m < 0:
            return self._initial
        words = self._words
        slot = self._slots[m & SLOT_MASK]
        sequence = sequence_of(m)
        word = words[slot]
        if slot_sequence(word) != sequence:
            self._wait_for_value(slot, sequence, m, src)
            word = words[slot]
        # Kept before the cursor moves: from then on the writer may overwrite the slot.
        self._taken = word
        words[self._my_cursor] = m + 1
        return slot_value(word)

    def _sequence_address(self, slot: int) -> int:
        """The address of the 32-bit sequence half of slot word ``slot``: the word readers park on."""
        return self.ring.address + slot * WORD_BYTES + SEQUENCE_HALF_AT

    def _min_cursor(self) -> int:
        return min(self._words[at] for at in self._cursors)

    def _make_room(self, n: int, src: int) -> None:
        needed = n - SHM_RING_SLOTS + 1
        if self._min_cursor() < needed:
            words, cursors = self._words, self._cursors

            def behind() -> list[int]:
                return [i for i, at in enumerate(cursors) if words[at] < needed]

            self._wait(
                lambda: all(words[at] >= needed for at in cursors),
                behind,
                src,
                lambda late: f" (ranks {late} have not taken the value of call {n - SHM_RING_SLOTS} yet)",
            )
        self._room_until = self._min_cursor() + SHM_RING_SLOTS - 1

    def _look_at_readers(self, n: int, src: int) -> None:
        """On the writer, after its publish of call ``n``, at most every ``LIVENESS_INTERVAL_S``: raise
        ``SignalGroupError`` for a reader that is gone without having made as many calls as this writer has (see
        the protocol), or that another member found gone."""
        now = time.monotonic()
        if now >= self._next_reader_check:
            self._next_reader_check = now + waiting.LIVENESS_INTERVAL_S
            lost = self._find_lost(lambda: self._gone_behind(n), src, now)
            if lost is not None:
                raise lost

    def _gone_behind(self, n: int) -> tuple[int, str] | None:
        words = self._words
        mine = words[self._my_cursor]
        if mine == 0:
            # Before the writer's first value, a reader that made every call so far has a cursor of 0 too.
            return None
        announced = n + 1
        for member in self._others:
            # A reader that announced it sleeps for this very call was alive after the last publish, and is being
            # woken right now: its /proc read, up to hundreds of microseconds after an idle spell, would take the
            # CPU it may be woken on. Were it dead, its announcement is stale at the next call, which judges it.
            if words[self._cursors[member]] <= mine and words[self._announcements[member]] != announced:
                found = self._gone([member])
                # Judged gone first, then the cursor read again: a reader that took one more value before it
                # exited has stored its cursor before it exited.
                if found is not None and words[self._cursors[member]] <= mine:
                    return found
        return None

    def _gone(self, members: list[int]) -> tuple[int, str] | None:
        """The first of ``members`` (member indexes) known to have exited, with why; None when all may be alive."""
        for member in members:
            reason = liveness.gone_reason(self.ring.identity(member))
            if reason is not None:
                return member, reason
        return None

    def _find_lost(
        self, judge: Callable[[], tuple[int, str] | None], src: int, started: float
    ) -> SignalGroupError | None:
        """The error for a member found gone: by another member (the mark at BROKEN_AT), else by ``judge()``,
        whose find is marked there for the others."""
        broken = self._words[BROKEN_AT // WORD_BYTES]
        if broken:
            detail = f"rank {broken - 1} exited, as another member found"
        else:
            found = judge()
            if found is None:
                return None
            member, reason = found
            self._words[BROKEN_AT // WORD_BYTES] = self._ranks[member] + 1
            detail = f"rank {self._ranks[member]}: {reason}"
        return SignalGroupError(lost_peer_message(self._ranks, src, time.monotonic() - started, detail))

    def _wait_for_value(self, slot: int, sequence: int, m: int, src: int) -> None:
        words = self._words
        writer = self._ranks.index(self._srcs[m & SLOT_MASK])
        park = None
        if self._futex is not None:
            wait, address, parked = self._futex.wait, self._sequence_address(slot), self._my_parked

            def park(seconds: float) -> None:
                # The futex contract: announce, then look once more, then sleep only while the slot still holds
                # what we saw (the kernel compares it atomically with going to sleep).
                words[parked] = m + 1
                seen = slot_sequence(words[slot])
                if seen != sequence:
                    wait(address, seen, seconds)

        try:
            self._wait(
                lambda: slot_sequence(words[slot]) == sequence,
                lambda: [writer],
                src,
                lambda late: f" (rank {late[0]} has not published the value of call {m})",
                park,
            )
        finally:
            words[self._my_parked] = 0

    def _wait(
        self,
        ready: Callable[[], bool],
        waited_on: Callable[[], list[int]],
        src: int,
        stuck_detail: Callable[[list[int]], str],
        park: Callable[[float], object] | None = None,
    ) -> None:
        """Wait until ``ready()``; ``waited_on()`` gives the member indexes whose liveness matters meanwhile.

        Raises ``SignalGroupError`` for a member found gone (and marks the segment so that the others know), and
        ``TimeoutError`` after the group's timeout, naming the late ranks through ``stuck_detail``."""
        started = time.monotonic()
        timeout, unjudged = self._timeout, ""
        if timeout is None and not all(self._judgeable[i] for i in waited_on()):
            timeout = UNJUDGED_TIMEOUT_S
            unjudged = (
                "; whether it is alive cannot be judged from here (another PID namespace, or no readable /proc), so "
                f"timeout=None waits {UNJUDGED_TIMEOUT_S:g} s per call"
            )

        def find_lost() -> SignalGroupError | None:
            return self._find_lost(lambda: self._gone(waited_on()), src, started)

        def warn(waited: float) -> None:
            late = [self._ranks[i] for i in waited_on()]
            logger.warning(
                "signal group (ranks %s): rank %d has waited %.0f s for a broadcast from src %d%s; still waiting, "
                "as long as the peers are alive",
                self._ranks,
                self._rank,
                waited,
                src,
                stuck_detail(late),
            )

        if not waiting.wait_until(ready, timeout, find_lost, park, warn):
            late = [self._ranks[i] for i in waited_on()]
            raise TimeoutError(
                stuck_peer_message(
                    self._ranks, src, time.monotonic() - started, timeout, stuck_detail(late) + unjudged
                )
            )

    def broken_by(self, exc: BaseException, src: int) -> str | None:
        """Why this end cannot go on after a call from ``src`` raised ``exc``: only a lost peer; any other exception
        (a timeout, an interrupt) leaves a call that ``resume`` finishes."""
        return f"a broadcast from src {src} lost a peer" if isinstance(exc, SignalGroupError) else None

    def close(self) -> None:
        """Unmap the segment; this end cannot be used afterwards."""
        self.ring.close()
