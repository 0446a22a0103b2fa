"""The gloo signal transport: one CPU int32 tensor broadcast on a gloo process group.

It is the path between hosts, and the fallback wherever shared memory cannot be mapped. Paddle's gloo fails every
op after a fixed 30 s, so a group that wants less gets a deadline thread; one that accepts the 30 s pays nothing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paddle
import paddle.distributed as dist

from fastdeploy_patch.signal_group.arguments import GLOO_OP_TIMEOUT_S
from fastdeploy_patch.signal_group.errors import SignalGroupError, lost_peer_message, stuck_peer_message

# A gloo error that arrives this close to gloo's own limit is that limit firing, not a peer going away.
_GLOO_LIMIT_SLACK_S = 1.0


@dataclass
class _DeadlineCaller:
    """Runs calls on a daemon thread so that the caller can give up after a deadline.

    A call stuck inside gloo cannot be interrupted; a daemon thread lets the caller stop waiting and the
    process still exit.
    """

    name: str
    _requests: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _unfinished: tuple[threading.Event, list[BaseException]] | None = None
    """The call handed to the thread that no caller has seen finish yet (a timeout, or an exception while waiting)."""

    def call(self, fn: Callable[[], object], timeout: float) -> bool:
        """Run ``fn`` and wait at most ``timeout`` seconds. Re-raises what ``fn`` raised; False on timeout. When an
        earlier call was left unfinished, waits for that one instead and does not run ``fn``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        request = self._unfinished
        if request is None:
            request = (threading.Event(), [])
            # Recorded, then queued, with no call between: no signal can land after one and before the other.
            self._unfinished = request
            self._requests.put((fn, *request))
        done, outcome = request
        if not done.wait(timeout):
            return False
        self._unfinished = None
        if outcome:
            raise outcome[0]
        return True

    def stop(self) -> None:
        """Let the thread end once it has finished what it runs now (it may be stuck in gloo: it is a daemon)."""
        self._requests.put(None)

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            fn, done, outcome = request
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the waiting caller
                outcome.append(exc)
            done.set()


class GlooTransport:
    """One member's end of a gloo signal group (``paddle_group``, made on the group's own rendezvous ``store``)."""

    def __init__(self, paddle_group: dist.communication.group.Group, *, timeout: float | None, store: object) -> None:
        self.paddle_group = paddle_group
        self._ranks = sorted(paddle_group.ranks)
        self._timeout = timeout
        # The group's own rendezvous store (the group's object holds it too, for as long as the group lives).
        self._store = store
        # Pay for a deadline thread only when the caller wants less than gloo's own limit.
        self._caller = (
            _DeadlineCaller(f"signal-{paddle_group.name}")
            if timeout is not None and timeout < GLOO_OP_TIMEOUT_S
            else None
        )
        # The last call whose op was started, and the last whose op is known finished: a call interrupted between
        # the two, with the op run on the caller's thread, may or may not have taken part.
        self._sent = -1
        self._done = -1
        self._failed: str | None = None
        # One CPU int32 reused by every broadcast: gloo sets up its transfer buffers per tensor address, so a fresh
        # tensor each step roughly doubled the step time here (about 240 against 130 us at 2 ranks).
        self.buffer = paddle.full([1], 0, dtype="int32", device="cpu")

    def broadcast(self, value: int | None, src: int, n: int) -> int:
        """Send ``value`` from src (None elsewhere: the buffer is overwritten by what arrives) as call ``n`` and
        return src's."""
        buffer = self.buffer
        if value is not None:
            buffer.fill_(value)
        self._sent = n
        self._run(lambda: dist.broadcast(buffer, src=src, group=self.paddle_group), src)
        self._done = n
        return int(buffer.item())

    def resume(self, value: int | None, src: int, n: int) -> int:
        """Finish call ``n``, which an earlier ``broadcast`` left early (``broken_by`` said it can be finished): read
        the value of an op that finished, wait for one still on the deadline thread (its value stands), or run a
        call that never started."""
        if self._done == n:
            return int(self.buffer.item())
        return self.broadcast(None if self._sent == n else value, src, n)

    def broken_by(self, exc: BaseException, src: int) -> str | None:
        """Why this end cannot go on after a call from ``src`` raised ``exc``; None when ``resume`` can finish it."""
        if self._failed is not None:
            return self._failed
        if isinstance(exc, SignalGroupError):
            return f"a broadcast from src {src} lost a peer"
        if self._caller is None and self._sent != self._done:
            return (
                f"a broadcast from src {src} was interrupted while gloo ran it, so this rank cannot know whether it "
                "took part in it"
            )
        return None

    def _run(self, send: Callable[[], object], src: int) -> None:
        started = time.monotonic()
        try:
            if self._caller is None:
                finished = True
                send()
            else:
                finished = self._caller.call(send, self._timeout)
        except RuntimeError as exc:
            waited = time.monotonic() - started
            if waited >= GLOO_OP_TIMEOUT_S - _GLOO_LIMIT_SLACK_S:
                # gloo's own limit: its op failed, and gloo cannot take part in a later one in step.
                self._failed = f"a broadcast from src {src} failed at gloo's own {GLOO_OP_TIMEOUT_S:g} s limit"
                raise TimeoutError(
                    f"signal broadcast from src {src} on the signal group (ranks {self._ranks}) got no answer after "
                    f"{waited:.1f} s: gloo fails every op after a fixed {GLOO_OP_TIMEOUT_S:g} s, and its group "
                    "cannot be used after that"
                ) from exc
            raise SignalGroupError(lost_peer_message(self._ranks, src, waited, str(exc))) from exc
        if not finished:
            raise TimeoutError(stuck_peer_message(self._ranks, src, time.monotonic() - started, self._timeout))

    def close(self) -> None:
        """Stop the deadline thread. The rendezvous store stays with the Paddle gloo group, which Paddle keeps
        registered (it has no way to remove one): dropping it here would leave the group pointing at a closed
        store."""
        if self._caller is not None:
            self._caller.stop()
