"""The signal group's error type and the wording both transports use for a stuck or a lost peer."""

from __future__ import annotations


class SignalGroupError(RuntimeError):
    """A signal broadcast failed because a peer exited or dropped its connection, or the group is unusable."""


def stuck_peer_message(ranks: list[int], src: int, waited: float, timeout: float | None, detail: str = "") -> str:
    """What a ``TimeoutError`` says: the group, the src, the time waited, who is late (when known), and that the
    same call may be made again."""
    return (
        f"signal broadcast from src {src} on the signal group (ranks {ranks}) got no answer after {waited:.1f} s "
        f"(timeout {timeout:g} s): a peer is slow or stuck{detail}; the group is still usable: call "
        f"broadcast_signal() again with src {src} to go on waiting for this call"
    )


def lost_peer_message(ranks: list[int], src: int, waited: float, detail: str) -> str:
    """What a ``SignalGroupError`` for a peer that went away says; ``detail`` names the peer or the cause."""
    return (
        f"signal broadcast from src {src} on the signal group (ranks {ranks}) failed after {waited:.2f} s: "
        f"a peer exited or dropped its connection ({detail})"
    )


RESTART_THE_WORLD = (
    "a rank of the group can no longer take part in step with the others, and a new group cannot be made with a "
    "rank missing (creation is collective over the whole world): restart every rank of the world"
)
"""The only way on after a lost peer or a broken gloo call: no rank can rejoin a running world."""

MAKE_A_NEW_GROUP = "every rank must create a new group with new_signal_group(), in the same order"
"""The way on after ``close()``: the world is whole, so a new group can be made."""


def unusable_message(ranks: list[int], why: str, advice: str) -> str:
    """What every call on a group that already failed (or was closed) says: why, and the one way on that works."""
    return f"the signal group (ranks {ranks}) is unusable: {why}; {advice}"
