"""One signal-group creation with a deadline: no rank waits on Paddle's stores without an end.

Paddle's TCP store has no wait with a deadline: ``get`` and ``wait`` block until the key is set, and even ``add``
blocks when the store's host stopped answering without closing its connections (a stopped process, or a dead one
whose forked child still holds its sockets). So a creation here never calls ``get`` or ``wait`` on a key that may
be missing: a rank makes its contribution under a key used once, counts it with ``add``, and the others poll that
count with ``add(key, 0)``, which returns at once; and every store call runs on a worker thread that the caller
stops waiting for at the creation's deadline (Paddle releases the GIL in its store calls and in gloo's rendezvous).

A rank whose creation fails for any reason publishes an error marker under the creation's keys, which every rank
looks at each time it polls: the others learn of it within a poll interval, not at their own deadline.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from fastdeploy_patch.signal_group.errors import SignalGroupError

T = TypeVar("T")

POLL_FIRST_S = 0.001
"""The first pause between two polls of a count; each later pause doubles, up to ``POLL_CAP_S``: a rank that is
already there answers within milliseconds, and one that loads weights for minutes costs the store a few requests a
second per waiting rank."""

POLL_CAP_S = 0.05
"""The longest pause between two polls: a rank learns of another rank's failure, or of the store host's exit,
within about this long (the promise is 2 s)."""

STORE_GRACE_S = 1.0
"""The least time a request to the global store is given, also at or after the deadline (the polls that find the
deadline passed, and the look at which ranks are late, are requests too): a store that answers at all answers in
well under a millisecond."""

PUBLISH_GRACE_S = 2.0
"""How long a failing rank may spend publishing its error marker after its deadline: inside the 5 s by which a
creation may overrun ``create_timeout``."""

STORE_HOST_RANK = 0
"""Paddle's ``init_parallel_env()`` makes world rank 0 the host of the global TCP store."""

RESTART = (
    "restart every rank of the world: creation is collective over the whole world and numbered in call order, so "
    "no rank can join or repeat a creation that failed"
)


def key_prefix(creation: int) -> str:
    """The global-store key prefix of this process's ``creation``-th signal group."""
    return f"fastdeploy_patch/signal_group/{creation}"


class _Worker:
    """A daemon thread that runs one blocking call at a time, so that the caller can stop waiting at a deadline.

    A call stuck in Paddle's C++ code cannot be interrupted: it stays on the thread, which is a daemon so that the
    process can still exit, and the worker refuses every later call."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.stuck: str | None = None

    def run(self, fn: Callable[[], T], timeout: float, what: str) -> tuple[bool, T | None]:
        """``(True, fn())`` when ``fn`` returned within ``timeout`` seconds, ``(False, None)`` when it did not (the
        worker is then stuck, for good). Re-raises what ``fn`` raised."""
        if self.stuck is not None:
            return False, None
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        done = threading.Event()
        outcome: list[Any] = []
        self._requests.put((fn, done, outcome))
        try:
            finished = done.wait(max(timeout, 0.0))
        except BaseException:
            # Interrupted while the call runs on: the thread may never come back to take another.
            self.stuck = what
            raise
        if not finished:
            self.stuck = what
            return False, None
        result, error = outcome
        if error is not None:
            raise error
        return True, result

    def stop(self) -> None:
        """End the thread: an idle one before this returns, so that no thread of ours is left for a later
        ``fork()`` to copy; a stuck one only with the process."""
        if self._thread is not None:
            self._requests.put(None)
            if self.stuck is None:
                self._thread.join()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            fn, done, outcome = request
            try:
                outcome.extend((fn(), None))
            except BaseException as exc:  # noqa: BLE001 - handed back to the waiting caller
                outcome.extend((None, exc))
            done.set()


class Creation:
    """The deadline, the keys and the store calls of signal-group creation number ``number`` on rank ``rank``.

    ``store`` is Paddle's global TCP store; ``members`` the group's sorted ranks, for messages. Use it as a context
    manager: on the way out its worker thread ends, and any exception is published as this rank's failure marker,
    but ``PeerFailed`` (a rank that learned of another's failure has nothing new to tell) and ``AgreedRefusal``
    (every rank reached it alike)."""

    def __init__(
        self,
        number: int,
        *,
        rank: int,
        world_size: int,
        members: list[int],
        timeout: float,
        store: Any,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.number = number
        self.prefix = key_prefix(number)
        self.rank = rank
        self.world = list(range(world_size))
        self.members = members
        self.timeout = timeout
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self.started = clock()
        self.deadline = self.started + timeout
        self._worker = _Worker(f"signal-group-creation-{number}")

    def __enter__(self) -> Creation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        try:
            if error is not None and not isinstance(error, (PeerFailed, AgreedRefusal)):
                self.publish_failure(f"{type(error).__name__}: {str(error).removesuffix(f'; {RESTART}')}")
        finally:
            self._worker.stop()

    def waited(self) -> float:
        """Seconds since this creation started on this rank."""
        return self._clock() - self.started

    def describe(self) -> str:
        """The creation as messages name it."""
        return f"creating signal group #{self.number} (ranks {self.members}) on rank {self.rank}"

    # --- calls that may block -------------------------------------------------------------------------------

    def call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` (a call that may block), given until the deadline. Raises ``TimeoutError`` saying ``what`` did
        not finish, re-raises what ``fn`` raised."""
        finished, result = self._worker.run(fn, self.deadline - self._clock(), what)
        if not finished:
            raise TimeoutError(
                f"{self.describe()} timed out after {self.waited():.1f} s (create_timeout {self.timeout:g} s): "
                f"{what} did not finish; {RESTART}"
            )
        return result

    def store_call(self, fn: Callable[[Any], T]) -> T:
        """``fn(global store)`` until the deadline. A store that does not answer by then raises ``TimeoutError``; a
        store error (its host, rank 0, exited: the connection was reset) becomes ``SignalGroupError``."""
        try:
            budget = max(self.deadline - self._clock(), STORE_GRACE_S)
            finished, result = self._worker.run(lambda: fn(self._store), budget, "store")
        except Exception as exc:
            raise SignalGroupError(
                f"{self.describe()} failed after {self.waited():.1f} s: Paddle's global store, hosted by rank "
                f"{STORE_HOST_RANK}, failed ({exc}): that rank has probably exited; {RESTART}"
            ) from exc
        if not finished:
            raise TimeoutError(
                f"{self.describe()} timed out after {self.waited():.1f} s (create_timeout {self.timeout:g} s): "
                f"Paddle's global store, hosted by rank {STORE_HOST_RANK}, did not answer: that rank is stopped, or "
                f"it exited while a process it forked still holds its connections; {RESTART}"
            )
        return result

    # --- keys ------------------------------------------------------------------------------------------------

    def key(self, name: str) -> str:
        """The global-store key ``name`` of this creation."""
        return f"{self.prefix}/{name}"

    def count_key(self, step: str, rank: int | None = None) -> str:
        """The key of the count of ranks done with ``step`` (with ``rank``: whether that rank is), apart from the
        keys that hold values (the store's ``add`` fails on a key that ``set`` wrote)."""
        return self.key(f"count/{step}" if rank is None else f"count/{step}/{rank}")

    def put(self, name: str, value: str) -> None:
        """Publish ``value`` under ``name`` (read it with ``take`` once ``name`` is counted by ``arrive``)."""
        self.store_call(lambda store: store.set(self.key(name), value))

    def take(self, name: str) -> str:
        """The value put under ``name``; call only once it is known to be there (``get`` waits without end)."""
        return bytes(self.store_call(lambda store: store.get(self.key(name)))).decode()

    def arrive(self, step: str) -> None:
        """Count this rank as done with ``step`` (after putting what the step publishes)."""
        self.store_call(lambda store: store.add(self.count_key(step, self.rank), 1))
        self.store_call(lambda store: store.add(self.count_key(step), 1))

    def await_all(self, step: str, ranks: Iterable[int], missing: str) -> None:
        """Poll until every rank of ``ranks`` has arrived at ``step``. Raises ``PeerFailed`` as soon as a rank
        published a failure, ``TimeoutError`` at the deadline naming the ranks that had not arrived (``missing``
        says what they did not do)."""
        ranks = list(ranks)
        pause = POLL_FIRST_S
        while True:
            self.check_failures()
            if self.store_call(lambda store: store.add(self.count_key(step), 0)) >= len(ranks):
                return
            now = self._clock()
            if now >= self.deadline:
                late = [
                    r for r in ranks if not self.store_call(lambda store, r=r: store.add(self.count_key(step, r), 0))
                ]
                raise TimeoutError(
                    f"{self.describe()} timed out after {self.waited():.1f} s (create_timeout {self.timeout:g} s): "
                    f"ranks {late} {missing}; {RESTART}"
                )
            self._sleep(min(pause, self.deadline - now))
            pause = min(2 * pause, POLL_CAP_S)

    # --- failure markers ----------------------------------------------------------------------------------------

    def check_failures(self) -> None:
        """Raise ``PeerFailed`` when some rank published a failure of this creation."""
        if self.store_call(lambda store: store.add(self.count_key("failures"), 0)):
            marker = json.loads(self.take("failure"))
            raise PeerFailed(
                f"{self.describe()} failed after {self.waited():.1f} s: rank {marker['rank']} could not create it "
                f"({marker['reason']}); {RESTART}"
            )

    def publish_failure(self, reason: str) -> None:
        """Best effort, within ``PUBLISH_GRACE_S``: tell the other ranks that this creation failed here and why."""
        if self._worker.stuck is not None:
            return  # the store does not answer: nobody would read it
        marker = json.dumps({"rank": self.rank, "reason": reason})

        def publish() -> None:
            self._store.set(self.key("failure"), marker)
            self._store.add(self.count_key("failures"), 1)

        try:
            self._worker.run(publish, PUBLISH_GRACE_S, "publishing the failure")
        except Exception:  # noqa: BLE001 - the store itself failed: its host is gone, and the others learn that
            pass


class PeerFailed(SignalGroupError):
    """Another rank published that this creation failed there."""


class AgreedRefusal(Exception):
    """Carries ``error``, a refusal that every rank reached from the same answers once the handshake had completed
    everywhere: the ranks are still in step, so it is neither published nor held against later creations."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
