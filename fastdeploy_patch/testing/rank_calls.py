"""What a rank function may call about its own call: ``exit_after_reply`` (reply, then leave the world) and
``keep_open`` (a signal group outlives the call on purpose).

These work in a rank of the rank pool (``pool_rank``) and in a rank the launcher started (``rank_entry``): each of
those runners says here, before it runs a function, how that function's reply is delivered. Importing this module
imports neither Paddle nor coverage.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:
    from fastdeploy_patch.signal_group import SignalGroup

T = TypeVar("T")

_deliver: Callable[[object, int], None] | None = None
# Weak: a kept group that its owner drops later is freed as usual, and is no longer anyone's leftover.
_kept: weakref.WeakSet[SignalGroup] = weakref.WeakSet()


def set_reply_delivery(deliver: Callable[[object, int], None] | None) -> None:
    """Runners only: how ``exit_after_reply`` hands over the current call's result (``deliver(result, code)``),
    or ``None`` outside a call."""
    global _deliver
    _deliver = deliver


def exit_after_reply(result: object, code: int = 0) -> NoReturn:
    """Deliver ``result`` as this rank's reply to the current call, save this rank's coverage data, and leave at
    once with ``os._exit(code)``.

    For fault tests: a rank that must vanish mid-test (or must not wait for a stuck peer at teardown) still gives
    its result, and its peers see a rank that left. In a pool rank the reply counts like a return, then the pool is
    recycled (reason "rank exited"); under ``launcher.run_ranks`` the result file is written as for a return and the
    rank's exit code is ``code``. Raises ``RuntimeError`` outside a rank call.
    """
    if _deliver is None:
        raise RuntimeError(
            "exit_after_reply() works only inside a rank function run by the paddle_ranks fixture (the rank pool) "
            "or by fastdeploy_patch.testing.launcher.run_ranks"
        )
    # Saved first: once the reply is out, the controller may kill this rank's session at any moment.
    save_coverage()
    _deliver(result, code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def keep_open(result: T, *groups: SignalGroup) -> T:
    """Return ``result`` unchanged, and mark ``groups`` as left open on purpose by the current call.

    A pool rank fails a call that leaves a ``SignalGroup`` it created open, since that group would still hold its
    segment or store when the next test runs on the same ranks. A call that keeps groups for later calls (module
    state shared between tests) says so with ``return keep_open(result, group, ...)``. Raises ``TypeError`` for an
    argument that is not a ``SignalGroup``.
    """
    from fastdeploy_patch.signal_group import SignalGroup

    for group in groups:
        if not isinstance(group, SignalGroup):
            raise TypeError(f"keep_open() keeps SignalGroups (what new_signal_group() returned), got {group!r}")
    _kept.update(groups)
    return result


def kept_groups() -> weakref.WeakSet[SignalGroup]:
    """The groups calls marked with ``keep_open`` that are still alive."""
    return _kept


def save_coverage() -> None:
    """Write what coverage measured in this process so far (a no-op when it measures nothing). Later saves add to
    the same per-process data file, so a rank killed after this loses nothing measured before it."""
    import coverage

    current = coverage.Coverage.current()
    if current is not None:
        current.save()
