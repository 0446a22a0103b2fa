"""The shared-memory segment's layout: where every word lives, and how a slot word packs a call's value.

Every number below is a named constant of this module; all words are native uint64, little-endian on x86-64 and
AArch64::

    offset                          what                                             written by
    0                     HEADER    MAGIC_AT      magic "FDPSIG" + 0x0001          creator, once
                                    VERSION_AT    LAYOUT_VERSION                   creator, once
                                    SLOTS_AT      SHM_RING_SLOTS                   creator, once
                                    MEMBERS_AT    member count                     creator, once
                                    NONCE_AT      random 64-bit nonce (in handle)  creator, once
                                    BROKEN_AT     0, or r + 1: rank r found gone   any member that finds it
    HEADER_BYTES (64)     MEMBER i  + CURSOR_AT   values consumed by member i      member i, every call
      + i * MEMBER_BYTES            + PID_AT      pid of member i                  member i, at attach
      (one 64-byte line             + START_AT    its start time (clock ticks)     member i, at attach
       per member; member           + PIDNS_AT    its PID-namespace inode          member i, at attach
       0 is the creator)            + PARKED_AT   m + 1 while member i may sleep   member i, when it parks
                                                  in FUTEX_WAIT for call m; else 0   and when it returns
    ring_at(n)            SLOT k    pack_slot(call, value):                        the src of the call
      + k * SLOT_BYTES                sequence_of(call) << SEQUENCE_SHIFT
                                      | (value & 0xffffffff)
                                    k = call % SHM_RING_SLOTS, sequence_of(call) = (call + 1) mod 2**32

A slot's word means:

    slot_sequence(word) == sequence_of(m)   the value of call m is published; a reader of call m takes
                                            slot_value(word)
    anything else (0 at start)              call m is not published yet; its reader waits

How the words are used, call by call, is ``shm_transport``'s protocol; how the segment is made, mapped and
removed is ``shm_segment``'s.
"""

from __future__ import annotations

import sys

from fastdeploy_patch.signal_group import liveness

SHM_RING_SLOTS = 64
"""Slots in the ring: how far the src may run ahead of the slowest reader (minus the lookahead). A power of two,
so that a call's slot is ``call & (SHM_RING_SLOTS - 1)``."""

LAYOUT_VERSION = 2
"""Version 2 added PARKED_AT (the futex announcement); members of another version refuse to attach."""
MAGIC = int.from_bytes(b"FDPSIG\x00\x01", "little")

WORD_BYTES = 8
HEADER_BYTES = 64
MAGIC_AT = 0
VERSION_AT = 8
SLOTS_AT = 16
MEMBERS_AT = 24
NONCE_AT = 32
BROKEN_AT = 40

# One cache line per member: each member stores its cursor every call, and must not slow the others' lines.
MEMBER_BYTES = 64
CURSOR_AT = 0
PID_AT = 8
START_AT = 16
PIDNS_AT = 24
PARKED_AT = 32

SLOT_BYTES = 8
SEQUENCE_SHIFT = 32
"""A slot word holds its sequence in the high 32 bits and the value in the low 32."""
SEQUENCE_HALF_AT = 4 if sys.byteorder == "little" else 0
"""Byte offset of the sequence half inside a native slot word: the 32-bit word a reader sleeps on."""
SLOT_MASK = SHM_RING_SLOTS - 1
"""``call & SLOT_MASK`` is the call's slot index."""
_HALF_MASK = 0xFFFFFFFF
_SIGN_BIT = 0x80000000


def members_at(member: int) -> int:
    """Byte offset of member ``member``'s record (its index among the sorted ranks)."""
    return HEADER_BYTES + member * MEMBER_BYTES


def ring_at(members: int) -> int:
    """Byte offset of slot 0 in a segment for ``members`` members."""
    return members_at(members)


def segment_bytes(members: int) -> int:
    """The size of a segment for ``members`` members."""
    return ring_at(members) + SHM_RING_SLOTS * SLOT_BYTES


def member_word(member: int, field: int) -> int:
    """The word index of ``field`` (``CURSOR_AT``, ``PID_AT``, ...) in member ``member``'s record."""
    return (members_at(member) + field) // WORD_BYTES


def slot_word(members: int, call: int) -> int:
    """The word index of the slot that carries call ``call``'s value, in a segment for ``members`` members."""
    return ring_at(members) // WORD_BYTES + (call & SLOT_MASK)


def sequence_of(call: int) -> int:
    """The sequence that marks call ``call``'s value as published: call + 1, modulo 2**32 (0 is never published)."""
    return (call + 1) & _HALF_MASK


def pack_slot(call: int, value: int) -> int:
    """The slot word that publishes int32 ``value`` as call ``call``'s."""
    return (sequence_of(call) << SEQUENCE_SHIFT) | (value & _HALF_MASK)


def slot_sequence(word: int) -> int:
    """The sequence a slot word holds."""
    return word >> SEQUENCE_SHIFT


def slot_value(word: int) -> int:
    """The int32 a slot word holds."""
    value = word & _HALF_MASK
    return value - (1 << 32) if value & _SIGN_BIT else value


def read_identity(words: memoryview, member: int) -> liveness.ProcessIdentity:
    """The process recorded for member index ``member`` in a segment's ``words`` (native uint64)."""
    return liveness.ProcessIdentity(
        words[member_word(member, PID_AT)], words[member_word(member, START_AT)], words[member_word(member, PIDNS_AT)]
    )
