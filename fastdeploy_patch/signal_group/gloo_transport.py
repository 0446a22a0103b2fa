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

    def call(self, fn: Callable[[], object], timeout: float) -> bool:
        """Run ``fn`` and wait at most ``timeout`` seconds. Re-raises what ``fn`` raised; False on timeout."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        done = threading.Event()
        outcome: list[BaseException] = []
        self._requests.put((fn, done, outcome))
        if not done.wait(timeout):
            return False
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

    def __init__(self, paddle_group: dist.communication.group.Group, *, timeout: float, store: object) -> None:
        self.paddle_group = paddle_group
        self._ranks = sorted(paddle_group.ranks)
        self._timeout = timeout
        # The group's own rendezvous store (the group's object holds it too, for as long as the group lives).
        self._store = store
        # Pay for a deadline thread only when the caller wants less than gloo's own limit.
        self._caller = _DeadlineCaller(f"signal-{paddle_group.name}") if timeout < GLOO_OP_TIMEOUT_S else None
        # One CPU int32 reused by every broadcast: gloo sets up its transfer buffers per tensor address, so a fresh
        # tensor each step roughly doubled the step time here (about 240 against 130 us at 2 ranks).
        self.buffer = paddle.full([1], 0, dtype="int32", device="cpu")

    def broadcast(self, value: int | None, src: int) -> int:
        """Send ``value`` from src (None elsewhere: the buffer is overwritten by what arrives) and return src's."""
        buffer = self.buffer
        if value is not None:
            buffer.fill_(value)
        self._run(lambda: dist.broadcast(buffer, src=src, group=self.paddle_group), src)
        return int(buffer.item())

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
                raise TimeoutError(stuck_peer_message(self._ranks, src, waited, self._timeout)) from exc
            raise SignalGroupError(lost_peer_message(self._ranks, src, waited, str(exc))) from exc
        if not finished:
            raise TimeoutError(stuck_peer_message(self._ranks, src, time.monotonic() - started, self._timeout))

    def close(self) -> None:
        """Stop the deadline thread. The rendezvous store stays with the Paddle gloo group, which Paddle keeps
        registered (it has no way to remove one): dropping it here would leave the group pointing at a closed
        store."""
        if self._caller is not None:
            self._caller.stop()
