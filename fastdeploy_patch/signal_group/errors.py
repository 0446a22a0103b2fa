"""The signal group's error type and the wording both transports use for a stuck or a lost peer."""

from __future__ import annotations


class SignalGroupError(RuntimeError):
    """A signal broadcast failed because a peer exited or dropped its connection, or the group is unusable."""


def stuck_peer_message(ranks: list[int], src: int, waited: float, timeout: float, detail: str = "") -> str:
    """What a ``TimeoutError`` says: the group, the src, the time waited, and (when known) who is late."""
    return (
        f"signal broadcast from src {src} on the signal group (ranks {ranks}) got no answer after {waited:.1f} s "
        f"(timeout {timeout:g} s): a peer is stuck and is not taking part{detail}"
    )


def lost_peer_message(ranks: list[int], src: int, waited: float, detail: str) -> str:
    """What a ``SignalGroupError`` for a peer that went away says; ``detail`` names the peer or the cause."""
    return (
        f"signal broadcast from src {src} on the signal group (ranks {ranks}) failed after {waited:.2f} s: "
        f"a peer exited or dropped its connection ({detail})"
    )


def unusable_message(ranks: list[int], why: str) -> str:
    """What every call on a group that already failed (or was closed) says."""
    return (
        f"the signal group (ranks {ranks}) is unusable: {why}; every rank must create a new group with "
        "new_signal_group() (after restarting the ranks that failed)"
    )
