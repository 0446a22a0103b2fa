"""The shared-memory transport on real segments in /dev/shm: the layout, create and attach, the ring protocol
(lockstep and lookahead, src changing, a full ring), dead and stuck peers, and ``check_shm_usable``.

Two members of one group live in this one process: each has its own mapping of the segment, and the tests call
them in turn (a writer, then its readers), or from two threads where both must wait for each other.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path
from unittest import mock

import pytest

from fastdeploy_patch.signal_group import (
    SignalGroup,
    SignalGroupError,
    broadcast_signal,
    futex,
    liveness,
    shm_layout,
    shm_segment,
    shm_transport,
    waiting,
)
from fastdeploy_patch.signal_group.shm_diagnostics import (
    Leftover,
    check_shm_usable,
    leftover_segments,
    segment_creator,
)
from fastdeploy_patch.signal_group.shm_layout import (
    BROKEN_AT,
    CURSOR_AT,
    LAYOUT_VERSION,
    MAGIC,
    MEMBER_BYTES,
    PARKED_AT,
    PID_AT,
    PIDNS_AT,
    SHM_RING_SLOTS,
    START_AT,
    member_word,
    members_at,
    pack_slot,
    ring_at,
    segment_bytes,
    sequence_of,
    slot_sequence,
    slot_value,
    slot_word,
)
from fastdeploy_patch.signal_group.shm_segment import (
    SEGMENT_PREFIX,
    SEGMENT_TAG_ENV,
    SHM_DIR,
    ShmHandle,
    ShmRing,
    segment_tag,
)
from fastdeploy_patch.signal_group.shm_transport import ShmTransport
from tests.unit.shm_calls import call

INITIAL = -7
RETRY_FROM_0, RETRY_FROM_5, RETRY_FROM_6 = (
    f"; the group is still usable: call broadcast_signal() again with src {src} to go on waiting for this call"
    for src in (0, 5, 6)
)


def test_the_layout_is_a_header_a_line_per_member_then_the_ring() -> None:
    assert [members_at(i) for i in range(3)] == [64, 128, 192]
    assert ring_at(2) == 192 and ring_at(4) == 320
    assert segment_bytes(2) == 192 + 64 * 8 and segment_bytes(4) == 320 + 64 * 8


def test_a_slot_word_is_the_sequence_of_its_call_above_the_value() -> None:
    # A futex waits on the sequence half alone: the 4 bytes at SEQUENCE_HALF_AT of the word in memory.
    in_memory = pack_slot(6, -1).to_bytes(8, sys.byteorder)
    half = in_memory[shm_layout.SEQUENCE_HALF_AT : shm_layout.SEQUENCE_HALF_AT + 4]
    assert int.from_bytes(half, sys.byteorder) == 7
    # Call m is published with sequence m + 1, modulo 2**32: 0 is never a published call's.
    assert [sequence_of(call) for call in (0, 1, 2**32 - 2, 2**32 - 1, 2**32)] == [1, 2, 2**32 - 1, 0, 1]
    assert pack_slot(0, 5) == (1 << 32) | 5
    assert pack_slot(2, -1) == (3 << 32) | 0xFFFFFFFF
    assert pack_slot(2**32 - 1, -(2**31)) == 0x80000000
    for value in (-(2**31), -1, 0, 1, 2**31 - 1):
        word = pack_slot(6, value)
        assert (slot_sequence(word), slot_value(word)) == (7, value)


def test_words_are_named_by_member_and_field_and_slots_by_call() -> None:
    assert member_word(0, CURSOR_AT) == 64 // 8 and member_word(1, PARKED_AT) == (128 + 32) // 8
    assert [member_word(2, at) for at in (CURSOR_AT, PID_AT, START_AT, PIDNS_AT)] == [24, 25, 26, 27]
    assert slot_word(2, 0) == 192 // 8 and slot_word(2, 1) == 192 // 8 + 1
    # The ring wraps: call 65 shares call 1's slot.
    assert slot_word(2, 65) == slot_word(2, 1) and slot_word(4, 63) == 320 // 8 + 63


def test_a_handle_travels_as_json() -> None:
    handle = ShmHandle("fdp_signal_ab", 704, (0, 3), 1, 2**64 - 1)
    assert ShmHandle.from_json(handle.to_json()) == handle


@pytest.fixture
def pair() -> Iterator[tuple[ShmRing, ShmRing]]:
    """The two members' mappings of one segment for ranks [0, 5]: rank 0 created it, rank 5 attached."""
    creator = ShmRing.create([0, 5])
    other = ShmRing.attach(creator.handle, 5)
    yield creator, other
    other.close()
    creator.close()


def test_create_makes_a_private_sized_segment_and_records_the_creator(pair: tuple[ShmRing, ShmRing]) -> None:
    creator, _ = pair
    handle = creator.handle
    assert handle.name.startswith(SEGMENT_PREFIX) and len(handle.name) == len(SEGMENT_PREFIX) + 16
    assert creator.path == os.path.join(SHM_DIR, handle.name)
    info = os.stat(creator.path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == segment_bytes(2) == handle.size
    assert (handle.ranks, handle.layout_version) == ((0, 5), LAYOUT_VERSION)
    words = creator.words
    assert [words[at // 8] for at in (0, 8, 16, 24, 32, 40)] == [MAGIC, 2, SHM_RING_SLOTS, 2, handle.nonce, 0]
    assert creator.identity(0) == liveness.this_process()


def test_two_creations_get_different_names_and_nonces() -> None:
    first, second = ShmRing.create([0, 1]), ShmRing.create([0, 1])
    try:
        assert first.handle.name != second.handle.name and first.handle.nonce != second.handle.nonce
    finally:
        first.close()
        second.close()


def test_attach_maps_the_same_memory_and_records_the_member(pair: tuple[ShmRing, ShmRing]) -> None:
    creator, other = pair
    assert other.handle == creator.handle and other.path == creator.path
    assert other.identity(1) == liveness.this_process()
    creator.words[ring_at(2) // 8 + 3] = 123456789
    assert other.words[ring_at(2) // 8 + 3] == 123456789


def test_only_the_creator_unlinks_and_the_mappings_outlive_the_name(pair: tuple[ShmRing, ShmRing]) -> None:
    creator, other = pair
    other.unlink()
    assert os.path.exists(creator.path)
    creator.unlink()
    creator.unlink()
    assert not os.path.exists(creator.path)
    creator.words[80] = 42
    assert other.words[80] == 42


def test_close_unmaps_once_and_the_creator_unlinks_if_nobody_did() -> None:
    creator = ShmRing.create([0, 1])
    creator.close()
    creator.close()
    assert not os.path.exists(creator.path)
    with pytest.raises(ValueError):
        _ = creator.words[0]


def test_close_succeeds_when_someone_else_removed_the_name_first() -> None:
    creator = ShmRing.create([0, 1])
    os.unlink(creator.path)
    creator.close()
    assert not os.path.exists(creator.path)
    with pytest.raises(ValueError):
        _ = creator.words[0]


def test_attach_says_when_the_segment_is_not_on_this_host(pair: tuple[ShmRing, ShmRing]) -> None:
    creator, _ = pair
    creator.unlink()
    with pytest.raises(OSError) as err:
        ShmRing.attach(creator.handle, 5)
    assert err.value.errno == errno.ENOENT
    assert err.value.strerror == (
        f"{creator.path} does not exist here (is this rank on another host, or in another mount namespace?)"
    )


def test_attach_refuses_a_file_of_another_size(pair: tuple[ShmRing, ShmRing]) -> None:
    creator, _ = pair
    handle = ShmHandle(creator.handle.name, 1024, (0, 5), 1, creator.handle.nonce)
    with pytest.raises(OSError) as err:
        ShmRing.attach(handle, 5)
    assert err.value.errno == errno.EINVAL
    assert err.value.strerror == f"{creator.path} holds {segment_bytes(2)} bytes, but the group's segment has 1024"


@pytest.mark.parametrize(
    "change", [{"nonce": 1}, {"layout_version": 3}, {"ranks": (0, 5, 6)}], ids=["nonce", "version", "members"]
)
def test_attach_refuses_a_segment_whose_header_does_not_match(pair: tuple[ShmRing, ShmRing], change: dict) -> None:
    creator, _ = pair
    fields = {**creator.handle.__dict__, **change}
    if "ranks" in change:
        # Same size as the real segment, so that only the header can tell.
        fields["size"] = creator.handle.size
    with pytest.raises(OSError) as err:
        ShmRing.attach(ShmHandle(**fields), 5)
    assert err.value.errno == errno.EINVAL
    assert err.value.strerror == (
        f"{creator.path} is not the group's segment (its header does not match the handle: another host's file of "
        "the same name, or mixed fastdeploy_patch versions; this one speaks layout 2)"
    )


def test_a_handle_of_another_layout_version_is_refused_even_with_a_matching_header(
    pair: tuple[ShmRing, ShmRing],
) -> None:
    creator, _ = pair
    creator.words[8 // 8] = 3
    with pytest.raises(OSError, match="is not the group's segment"):
        ShmRing.attach(ShmHandle(**{**creator.handle.__dict__, "layout_version": 3}), 5)


def test_create_removes_its_file_when_the_segment_cannot_be_sized(tmp_path: os.PathLike) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(shm_segment.os, "posix_fallocate", side_effect=full), pytest.raises(OSError) as err:
        ShmRing.create([0, 1], shm_dir=str(tmp_path))
    assert err.value is full
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("tag", "infix"), [(None, ""), ("", ""), ("w1234abc", "w1234abc_"), ("Z" * 32, "Z" * 32 + "_")]
)
def test_a_segment_name_carries_the_tag_its_creator_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str | None, infix: str
) -> None:
    if tag is None:
        monkeypatch.delenv(SEGMENT_TAG_ENV, raising=False)
    else:
        monkeypatch.setenv(SEGMENT_TAG_ENV, tag)
    ring = ShmRing.create([0, 1], shm_dir=str(tmp_path))
    try:
        assert re.fullmatch(re.escape(SEGMENT_PREFIX + infix) + "[0-9a-f]{16}", ring.handle.name)
        assert os.listdir(tmp_path) == [ring.handle.name]
        assert segment_tag() == (tag or "")
    finally:
        ring.close()


@pytest.mark.parametrize("tag", ["../x", "a.b", "has space", "Z" * 33, "é"])
def test_a_bad_segment_tag_is_refused_before_a_file_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str
) -> None:
    monkeypatch.setenv(SEGMENT_TAG_ENV, tag)
    with pytest.raises(ValueError) as err:
        ShmRing.create([0, 1], shm_dir=str(tmp_path))
    assert str(err.value) == f"{SEGMENT_TAG_ENV} must be 1 to 32 ASCII letters and digits, got {tag!r}"
    assert os.listdir(tmp_path) == []


def test_a_new_mapping_never_takes_or_removes_an_existing_file(tmp_path: Path) -> None:
    taken = tmp_path / f"{SEGMENT_PREFIX}taken"
    taken.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        shm_segment._new_mapping(str(taken), 4096)
    assert taken.read_bytes() == b"someone else's"


# --- the resource tracker: a creator killed before the handshake unlinked leaves nothing -------------------------


@pytest.fixture
def tracker(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, bool]]:
    """resource_tracker's register and unregister, recorded with whether the file existed at that moment."""
    events: list[tuple[str, str, str, bool]] = []

    def recording(command: str) -> Callable[[str, str], None]:
        def call(name: str, rtype: str) -> None:
            events.append((command, name, rtype, os.path.exists(SHM_DIR + name)))

        return call

    monkeypatch.setattr(resource_tracker, "register", recording("register"))
    monkeypatch.setattr(resource_tracker, "unregister", recording("unregister"))
    return events


def test_only_the_creator_registers_the_name_before_the_file_exists_and_unregisters_it_once_removed(
    tracker: list[tuple[str, str, str, bool]],
) -> None:
    creator = ShmRing.create([0, 5])
    other = ShmRing.attach(creator.handle, 5)
    name = "/" + creator.handle.name
    other.close()
    assert tracker == [("register", name, "shared_memory", False)]
    creator.unlink()
    creator.close()
    assert tracker == [("register", name, "shared_memory", False), ("unregister", name, "shared_memory", False)]


def test_a_creator_whose_segment_cannot_be_made_unregisters_its_name(
    tracker: list[tuple[str, str, str, bool]],
) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(shm_segment.os, "posix_fallocate", side_effect=full), pytest.raises(OSError) as err:
        ShmRing.create([0, 1])
    assert err.value is full
    (_, name, _, _), unregistered = tracker
    assert name.startswith("/" + SEGMENT_PREFIX) and unregistered == ("unregister", name, "shared_memory", False)


def test_a_segment_outside_dev_shm_is_not_tracked(tracker: list[tuple[str, str, str, bool]], tmp_path: Path) -> None:
    # The tracker removes names with shm_unlink, which reaches only /dev/shm.
    ShmRing.create([0, 1], shm_dir=str(tmp_path)).close()
    assert tracker == []


def test_a_creator_killed_by_sigkill_leaves_its_segment_to_its_resource_tracker() -> None:
    code = (
        "import os, signal; from fastdeploy_patch.signal_group.shm_transport import ShmRing; "
        "ring = ShmRing.create([0, 1]); print(ring.path, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    # The tracker holds the child's stderr: run() returns once it has cleaned up and exited.
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    path = child.stdout.strip()
    leaked = os.path.exists(path)
    if leaked:
        os.unlink(path)
    assert child.returncode == -signal.SIGKILL and path.startswith(f"{SHM_DIR}/{SEGMENT_PREFIX}")
    assert not leaked, child.stderr
    assert "There appear to be 1 leaked shared_memory objects to clean up at shutdown" in child.stderr


# --- leftovers: segments whose creator is gone ------------------------------------------------------------------


def _segment_file(path: Path, creator: liveness.ProcessIdentity, magic: int = MAGIC) -> Path:
    """A segment as a creator left it: the header's magic and the creator's record, the rest zero."""
    words = memoryview(bytearray(segment_bytes(2))).cast("Q")
    words[0] = magic
    words[member_word(0, PID_AT)] = creator.pid
    words[member_word(0, START_AT)] = creator.start_ticks
    words[member_word(0, PIDNS_AT)] = creator.pid_namespace
    path.write_bytes(words.tobytes())
    return path


def test_a_segments_creator_is_read_from_its_first_member_record(
    pair: tuple[ShmRing, ShmRing], tmp_path: Path
) -> None:
    creator, _ = pair
    assert segment_creator(creator.path) == liveness.this_process()
    me = liveness.this_process()
    assert segment_creator(str(_segment_file(tmp_path / "other", me, magic=MAGIC + 1))) is None
    short = tmp_path / "short"
    short.write_bytes(_segment_file(tmp_path / "whole", me).read_bytes()[: members_at(1) - 1])
    assert segment_creator(str(short)) is None
    assert segment_creator(str(tmp_path / "missing")) is None


def test_leftovers_are_our_segments_whose_creator_is_gone(tmp_path: Path) -> None:
    me = liveness.this_process()
    gone = liveness.ProcessIdentity(_gone_pid(), me.start_ticks, me.pid_namespace)
    second = liveness.ProcessIdentity(_gone_pid(), me.start_ticks, me.pid_namespace)
    left = _segment_file(tmp_path / f"{SEGMENT_PREFIX}b", gone)
    also_left = _segment_file(tmp_path / f"{SEGMENT_PREFIX}a", second)
    _segment_file(tmp_path / f"{SEGMENT_PREFIX}alive", me)
    # A creator in another PID namespace, or not recorded yet, cannot be judged from here.
    _segment_file(tmp_path / f"{SEGMENT_PREFIX}elsewhere", liveness.ProcessIdentity(gone.pid, 1, me.pid_namespace + 1))
    _segment_file(tmp_path / f"{SEGMENT_PREFIX}new", liveness.ProcessIdentity(0, 0, 0))
    _segment_file(tmp_path / f"{SEGMENT_PREFIX}notours", gone, magic=7)
    _segment_file(tmp_path / "psm_someone_elses", gone)
    # Listed first: a name of someone else's does not end the scan.
    _segment_file(tmp_path / "a_first_name", gone)
    assert leftover_segments(str(tmp_path)) == [
        Leftover(str(also_left), second, f"process {second.pid} is gone"),
        Leftover(str(left), gone, f"process {gone.pid} is gone"),
    ]


def test_no_leftovers_without_the_directory(tmp_path: Path) -> None:
    assert leftover_segments(str(tmp_path / "nope")) == []


def test_check_shm_usable_passes_here_and_leaves_nothing() -> None:
    # Only the segment this check made is looked for: other tests create and remove theirs in SHM_DIR meanwhile.
    made: list[str] = []
    create = ShmRing.create

    def recording_create(*args, **kwargs) -> ShmRing:
        ring = create(*args, **kwargs)
        made.append(ring.path)
        return ring

    with mock.patch.object(ShmRing, "create", side_effect=recording_create):
        check_shm_usable()
    assert len(made) == 1 and os.path.dirname(made[0]) == SHM_DIR
    assert os.path.basename(made[0]).startswith(SEGMENT_PREFIX)
    assert not os.path.exists(made[0])


def test_check_shm_usable_works_in_the_directory_given_and_leaves_nothing_there(tmp_path: Path) -> None:
    check_shm_usable(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_check_shm_usable_says_when_the_directory_is_missing(tmp_path: os.PathLike) -> None:
    missing = os.path.join(tmp_path, "nope")
    with pytest.raises(OSError) as err:
        check_shm_usable(missing)
    assert err.value.errno == errno.ENOENT
    assert err.value.strerror == f"{missing} is not a directory: shared memory needs a tmpfs mounted there"


def test_check_shm_usable_says_when_no_segment_can_be_created(tmp_path: os.PathLike) -> None:
    denied = PermissionError(errno.EACCES, "Permission denied")
    with mock.patch.object(ShmRing, "create", side_effect=denied), pytest.raises(OSError) as err:
        check_shm_usable(str(tmp_path))
    assert err.value.errno == errno.EACCES and err.value.__cause__ is denied
    assert err.value.strerror == f"cannot create a shared-memory segment in {tmp_path}: Permission denied"


def test_check_shm_usable_says_when_two_mappings_do_not_share_memory(tmp_path: os.PathLike) -> None:
    elsewhere = ShmRing.create([0, 1], shm_dir=str(tmp_path))
    try:
        with mock.patch.object(ShmRing, "attach", return_value=elsewhere), pytest.raises(OSError) as err:
            check_shm_usable(str(tmp_path))
        assert err.value.errno == errno.EIO
        assert "did not show through another" in err.value.strerror
    finally:
        elsewhere.close()
    assert os.listdir(tmp_path) == []


# --- the ring protocol ----------------------------------------------------------------------------------------


def _ends(pair: tuple[ShmRing, ShmRing], *, lookahead: int = 0, timeout: float = 5.0) -> list[ShmTransport]:
    creator, other = pair
    return [
        ShmTransport(creator, 0, timeout=timeout, lookahead=lookahead, initial=INITIAL),
        ShmTransport(other, 5, timeout=timeout, lookahead=lookahead, initial=INITIAL),
    ]


def _call(ends: list[ShmTransport], value: int, src: int) -> list[int]:
    """One call on both members: the src first (it never waits for a reader), then the other."""
    ranks = [0, 5]
    order = sorted(range(2), key=lambda i: ranks[i] != src)
    got = [0, 0]
    for i in order:
        got[i] = call(ends[i], value if ranks[i] == src else None, src)
    return got


def test_every_member_gets_srcs_value_from_either_src(pair: tuple[ShmRing, ShmRing]) -> None:
    ends = _ends(pair)
    values = [-(2**31), 2**31 - 1, -1, 0, 1, 77, -77]
    for step, value in enumerate(values * 3):
        src = (0, 5)[step % 2]
        assert _call(ends, value, src) == [value, value], (step, src)


def test_a_zero_right_after_another_value_arrives_as_zero(pair: tuple[ShmRing, ShmRing]) -> None:
    ends = _ends(pair)
    assert [_call(ends, v, 0) for v in (-1, 0, 1, 0, 0)] == [[-1, -1], [0, 0], [1, 1], [0, 0], [0, 0]]


def test_the_slot_word_packs_the_sequence_above_the_value(pair: tuple[ShmRing, ShmRing]) -> None:
    ends = _ends(pair)
    _call(ends, -2, 0)
    _call(ends, 3, 5)
    slot0 = ring_at(2) // 8
    assert pair[0].words[slot0] == (1 << 32) | 0xFFFFFFFE
    assert pair[0].words[slot0 + 1] == (2 << 32) | 3
    # Each member's cursor counts the values it has taken.
    assert [pair[0].words[members_at(i) // 8] for i in (0, 1)] == [2, 2]


def test_the_sequence_wraps_at_two_to_the_32(pair: tuple[ShmRing, ShmRing]) -> None:
    ends = _ends(pair)
    for end in ends:
        end.calls_made = 2**32 - 2
        end._room_until = 2**33
    assert _call(ends, 5, 0) == [5, 5]
    assert _call(ends, 6, 5) == [6, 6]
    # Call 2**32 - 1 is published with sequence 0, the next with 1.
    assert pair[0].words[ring_at(2) // 8 + SHM_RING_SLOTS - 1] == (0 << 32) | 6


@pytest.mark.parametrize("lookahead", [1, 3, 32])
def test_lookahead_returns_the_value_published_that_many_calls_earlier(
    pair: tuple[ShmRing, ShmRing], lookahead: int
) -> None:
    ends = _ends(pair, lookahead=lookahead)
    sent = [1000 + step for step in range(200)]
    # The src changes every call and every third call: inside any window of calls.
    srcs = [(0, 5)[(step // 3 + step) % 2] for step in range(200)]
    got = [_call(ends, value, src) for value, src in zip(sent, srcs, strict=True)]
    expected = [INITIAL] * lookahead + sent[: 200 - lookahead]
    assert [g[0] for g in got] == expected and [g[1] for g in got] == expected


def test_a_reader_waits_only_when_more_than_lookahead_calls_ahead_of_the_src(pair: tuple[ShmRing, ShmRing]) -> None:
    reader = _ends(pair, lookahead=2, timeout=0.05)[1]
    assert [call(reader, None, 0), call(reader, None, 0)] == [INITIAL, INITIAL]
    with pytest.raises(TimeoutError) as err:
        call(reader, None, 0)
    assert str(err.value).startswith("signal broadcast from src 0 on the signal group (ranks [0, 5]) got no answer")
    assert str(err.value).endswith(
        "(timeout 0.05 s): a peer is slow or stuck (rank 0 has not published the value of call 0); the group is "
        "still usable: call broadcast_signal() again with src 0 to go on waiting for this call"
    )


def test_the_src_runs_ahead_by_the_ring_and_then_waits_for_the_slowest_reader(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, _ = _ends(pair, lookahead=4, timeout=0.05)
    for step in range(SHM_RING_SLOTS):
        call(writer, step, 0)
    with pytest.raises(TimeoutError) as err:
        call(writer, SHM_RING_SLOTS, 0)
    assert str(err.value).endswith(
        "(timeout 0.05 s): a peer is slow or stuck (ranks [5] have not taken the value of call 0 yet); the group is "
        "still usable: call broadcast_signal() again with src 0 to go on waiting for this call"
    )


def test_the_src_takes_the_room_readers_made(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, reader = _ends(pair, timeout=0.05)
    for step in range(3 * SHM_RING_SLOTS):
        assert call(writer, step, 0) == step
        if step >= SHM_RING_SLOTS - 1:
            assert call(reader, None, 0) == step - SHM_RING_SLOTS + 1
    assert writer._room_until >= 3 * SHM_RING_SLOTS - 1


def test_threads_in_lockstep_and_with_lookahead_see_the_whole_stream(pair: tuple[ShmRing, ShmRing]) -> None:
    """Both members really wait for each other here (the src often finds the ring full, a reader an empty slot)."""
    steps = 3000
    for lookahead in (0, 5):
        ends = _ends(pair, lookahead=lookahead)
        got: list[list[int]] = [[], []]

        def run(me: int, ends: list[ShmTransport] = ends, got: list[list[int]] = got) -> None:
            rank = (0, 5)[me]
            for step in range(steps):
                src = (0, 5)[(step // 7) % 2]
                got[me].append(call(ends[me], step * 3 if rank == src else None, src))

        threads = [threading.Thread(target=run, args=(me,)) for me in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        expected = [INITIAL] * lookahead + [step * 3 for step in range(steps - lookahead)]
        assert got == [expected, expected], lookahead
        # The next group on the same segment starts from clean slots.
        for at in range(ring_at(2) // 8, segment_bytes(2) // 8):
            pair[0].words[at] = 0
        for i in (0, 1):
            pair[0].words[members_at(i) // 8] = 0


# --- dead peers -----------------------------------------------------------------------------------------------


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _pretend_member_is(ring: ShmRing, member: int, pid: int) -> None:
    at = members_at(member) // 8
    ring.words[at + 1] = pid


def test_a_src_that_exited_fails_its_readers_before_their_timeout(pair: tuple[ShmRing, ShmRing]) -> None:
    _, reader = _ends(pair, timeout=30)
    pid = _gone_pid()
    _pretend_member_is(pair[0], 0, pid)
    with pytest.raises(SignalGroupError) as err:
        call(reader, None, 0)
    # The liveness check, not the 30 s timeout, ended the wait (its cadence is pinned on a fake clock elsewhere).
    message = str(err.value)
    header = r"signal broadcast from src 0 on the signal group \(ranks \[0, 5\]\) failed after \d+\.\d+ s"
    assert re.match(header, message), message
    assert message.endswith(f"a peer exited or dropped its connection (rank 0: process {pid} is gone)")
    # Left in the segment for the members that wait on someone else.
    assert pair[0].words[BROKEN_AT // 8] == 0 + 1


def test_a_mark_left_by_another_member_fails_a_waiter_fast(pair: tuple[ShmRing, ShmRing]) -> None:
    _, reader = _ends(pair, timeout=30)
    pair[0].words[BROKEN_AT // 8] = 7 + 1
    with pytest.raises(SignalGroupError) as err:
        call(reader, None, 0)
    assert str(err.value).endswith("a peer exited or dropped its connection (rank 7 exited, as another member found)")


def test_a_reader_that_exited_fails_the_src_once_the_ring_is_full(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, _ = _ends(pair, timeout=30)
    # The src's periodic look at its readers (tested below) is put off, so that only the full ring can tell.
    writer._next_reader_check = math.inf
    pid = _gone_pid()
    _pretend_member_is(pair[0], 1, pid)
    for step in range(SHM_RING_SLOTS):
        call(writer, step, 0)
    with pytest.raises(SignalGroupError) as err:
        call(writer, 0, 0)
    assert str(err.value).endswith(f"a peer exited or dropped its connection (rank 5: process {pid} is gone)")


def test_a_src_that_published_and_exited_fails_nobody(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, reader = _ends(pair, lookahead=2, timeout=30)
    for value in (1, 2, 3):
        call(writer, value, 0)
    _pretend_member_is(pair[0], 0, _gone_pid())
    assert [call(reader, None, 0) for _ in range(4)] == [INITIAL, INITIAL, 1, 2]


def test_a_reader_judges_the_src_of_the_call_it_waits_for_not_of_this_call(pair: tuple[ShmRing, ShmRing]) -> None:
    """With lookahead 2, call 2's value comes from call 0's src; rank 5, src of calls 1 and 2, is alive."""
    _, reader = _ends(pair, lookahead=2, timeout=30)
    pid = _gone_pid()
    _pretend_member_is(pair[0], 0, pid)
    assert call(reader, None, 0) == INITIAL
    assert call(reader, 11, 5) == INITIAL
    with pytest.raises(SignalGroupError, match=rf"\(rank 0: process {pid} is gone\)$"):
        call(reader, 12, 5)


def test_a_shm_timeout_leaves_the_group_usable_and_only_a_lost_peer_breaks_it(pair: tuple[ShmRing, ShmRing]) -> None:
    ends = _ends(pair, timeout=0.05)
    groups = [
        SignalGroup(transport="shm", ranks=[0, 5], rank=rank, timeout=0.05, lookahead=0, endpoint=end)
        for rank, end in zip((0, 5), ends, strict=True)
    ]
    for _ in range(2):
        with pytest.raises(TimeoutError):
            broadcast_signal(0, src=0, group=groups[1])
    with pytest.raises(ValueError, match=r"^src 5 is not the src of the call that ended early on this rank \(src 0\)"):
        broadcast_signal(0, src=5, group=groups[1])
    assert broadcast_signal(41, src=0, group=groups[0]) == 41
    assert broadcast_signal(0, src=0, group=groups[1]) == 41
    assert [broadcast_signal(42, src=5, group=groups[1]), broadcast_signal(0, src=5, group=groups[0])] == [42, 42]
    _pretend_member_is(pair[0], 1, _gone_pid())
    ends[0]._next_reader_check = math.inf
    for step in range(SHM_RING_SLOTS):
        broadcast_signal(step, src=0, group=groups[0])
    with pytest.raises(SignalGroupError, match=r"process \d+ is gone\)$"):
        broadcast_signal(1, src=0, group=groups[0])
    with pytest.raises(SignalGroupError, match=r"is unusable: a broadcast from src 0 lost a peer; .*restart every"):
        broadcast_signal(1, src=0, group=groups[0])


# --- slow readers: room, and the src that waits for it --------------------------------------------------------


def test_a_slow_reader_keeps_every_value_the_src_may_not_overwrite_an_untaken_slot(
    pair: tuple[ShmRing, ShmRing],
) -> None:
    writer, reader = _ends(pair, timeout=0.05)
    for step in range(SHM_RING_SLOTS):
        call(writer, step, 0)
    assert call(reader, None, 0) == 0
    # One value taken: room for exactly one more call, and not two.
    call(writer, SHM_RING_SLOTS, 0)
    with pytest.raises(TimeoutError) as err:
        call(writer, SHM_RING_SLOTS + 1, 0)
    assert str(err.value).endswith("(ranks [5] have not taken the value of call 1 yet)" + RETRY_FROM_0)
    assert [call(reader, None, 0) for _ in range(SHM_RING_SLOTS)] == list(range(1, SHM_RING_SLOTS + 1))
    assert call(writer, SHM_RING_SLOTS + 1, 0) == SHM_RING_SLOTS + 1
    assert call(reader, None, 0) == SHM_RING_SLOTS + 1


def test_a_src_waiting_for_room_goes_on_as_soon_as_a_reader_takes_a_value(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, reader = _ends(pair, timeout=20.0)
    for step in range(SHM_RING_SLOTS):
        call(writer, step, 0)
    taken: list[int] = []
    late_reader = threading.Timer(0.05, lambda: taken.append(call(reader, None, 0)))
    late_reader.start()
    started = time.monotonic()
    assert call(writer, SHM_RING_SLOTS, 0) == SHM_RING_SLOTS
    late_reader.join()
    assert taken == [0]
    # Far below the 20 s timeout, which a readiness check that is never true would run into.
    assert time.monotonic() - started < 10.0


def test_a_src_that_waited_for_room_in_vain_names_itself_and_only_the_readers_behind() -> None:
    """Ranks [0, 5, 6], src 5: rank 0 took the first value, which is exactly the room the next publish needs, and
    rank 6 took none. The timeout names src 5 and rank 6 alone."""
    creator = ShmRing.create([0, 5, 6])
    rings = [creator, ShmRing.attach(creator.handle, 5), ShmRing.attach(creator.handle, 6)]
    try:
        first, writer, _ = (
            ShmTransport(r, rank, timeout=0.05, lookahead=0, initial=INITIAL)
            for r, rank in zip(rings, (0, 5, 6), strict=True)
        )
        assert [call(writer, step, 5) for step in range(SHM_RING_SLOTS)] == list(range(SHM_RING_SLOTS))
        assert call(first, None, 5) == 0
        with pytest.raises(TimeoutError) as err:
            call(writer, SHM_RING_SLOTS, 5)
        message = str(err.value)
        assert message.startswith("signal broadcast from src 5 on the signal group (ranks [0, 5, 6]) got no answer")
        assert message.endswith("(ranks [6] have not taken the value of call 0 yet)" + RETRY_FROM_5)
    finally:
        for ring in reversed(rings):
            ring.close()


def test_a_reader_watches_the_src_of_the_call_it_waits_for_among_three_members() -> None:
    """Lookahead 1, srcs 0 then 6: rank 5's call 2 waits for call 1's value, so rank 6 is the one watched (and
    named), not rank 0, the src of the group's first call, which is gone."""
    creator = ShmRing.create([0, 5, 6])
    rings = [creator, ShmRing.attach(creator.handle, 5), ShmRing.attach(creator.handle, 6)]
    try:
        ends = [
            ShmTransport(r, rank, timeout=0.2, lookahead=1, initial=INITIAL)
            for r, rank in zip(rings, (0, 5, 6), strict=True)
        ]
        assert call(ends[0], 10, 0) == INITIAL
        _pretend_member_is(creator, 0, _gone_pid())
        assert call(ends[1], None, 0) == INITIAL
        assert call(ends[1], None, 6) == 10
        with pytest.raises(TimeoutError) as err:
            call(ends[1], None, 6)
        assert str(err.value).endswith("(rank 6 has not published the value of call 1)" + RETRY_FROM_6)
    finally:
        for ring in reversed(rings):
            ring.close()


def _waited(message: str, pattern: str) -> float:
    found = re.search(pattern, message)
    assert found, message
    return float(found.group(1))


def test_a_timeout_reports_the_time_it_waited(pair: tuple[ShmRing, ShmRing]) -> None:
    _, reader = _ends(pair, timeout=0.3)
    with pytest.raises(TimeoutError) as err:
        call(reader, None, 0)
    assert 0.3 <= _waited(str(err.value), r"got no answer after (\d+\.\d) s \(timeout 0\.3 s\)") < 5.0


def test_a_lost_peer_reports_the_time_it_waited(pair: tuple[ShmRing, ShmRing]) -> None:
    _, reader = _ends(pair, timeout=30)
    _pretend_member_is(pair[0], 0, _gone_pid())
    with pytest.raises(SignalGroupError) as err:
        call(reader, None, 0)
    assert 0.05 <= _waited(str(err.value), r"failed after (\d+\.\d\d) s") < 1.0


# --- the src looks at its readers -----------------------------------------------------------------------------


def _checking_every_call(end: ShmTransport) -> None:
    end._next_reader_check = 0.0


@pytest.mark.parametrize("lookahead", [0, 4])
def test_a_dead_reader_fails_the_src_at_its_first_check_once_it_has_taken_a_value(
    pair: tuple[ShmRing, ShmRing], lookahead: int
) -> None:
    writer, _ = _ends(pair, lookahead=lookahead, timeout=30)
    pid = _gone_pid()
    _pretend_member_is(pair[0], 1, pid)
    for step in range(lookahead + 1):
        _checking_every_call(writer)
        call(writer, step, 0)
    _checking_every_call(writer)
    with pytest.raises(SignalGroupError) as err:
        call(writer, 99, 0)
    assert str(err.value).startswith(
        "signal broadcast from src 0 on the signal group (ranks [0, 5]) failed after 0.00 s: "
    )
    assert str(err.value).endswith(f"a peer exited or dropped its connection (rank 5: process {pid} is gone)")
    # Found after publishing (the value stays there for the live readers), and marked for the other members.
    assert pair[0].words[ring_at(2) // 8 + lookahead + 1] == pack_slot(lookahead + 1, 99)
    assert pair[0].words[BROKEN_AT // 8] == 5 + 1


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[ShmRing, int], None]:
    """A fake /proc with no process in it: ``gone(ring, member)`` records member as pid 4242 of the fake's PID
    namespace, which the fake /proc says is gone."""
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "pid").write_text("")
    monkeypatch.setattr(liveness, "PROC", str(tmp_path))
    namespace = os.stat(tmp_path / "self" / "ns" / "pid").st_ino

    def gone(ring: ShmRing, member: int) -> None:
        for at, word in ((PID_AT, 4242), (START_AT, 777), (PIDNS_AT, namespace)):
            ring.words[member_word(member, at)] = word

    return gone


def test_the_src_publishes_and_wakes_before_it_reads_the_clock_or_proc(
    fake_futex: FakeFutex, fake_proc: Callable[[ShmRing, int], None]
) -> None:
    """A fake clock and a fake /proc record what the readers could see at each clock and /proc read of the src: in
    the call that finds a reader gone, the value is published, and the other reader, asleep, woken, before either."""
    creator = ShmRing.create([0, 5, 6])
    rings = [creator, ShmRing.attach(creator.handle, 5), ShmRing.attach(creator.handle, 6)]
    fake_futex.ring = creator
    now = [1000.0]
    moments: list[tuple[str, int, int]] = []
    slot = slot_word(3, 1)
    real_gone_reason = liveness.gone_reason

    def monotonic() -> float:
        moments.append(("clock", creator.words[slot], len(fake_futex.wakes)))
        return now[0]

    def gone_reason(peer: liveness.ProcessIdentity) -> str | None:
        moments.append(("/proc", creator.words[slot], len(fake_futex.wakes)))
        return real_gone_reason(peer)

    try:
        writer, *readers = [
            ShmTransport(ring, rank, timeout=30, lookahead=0, initial=INITIAL)
            for ring, rank in zip(rings, (0, 5, 6), strict=True)
        ]
        with (
            mock.patch.object(shm_transport.time, "monotonic", monotonic),
            mock.patch.object(shm_transport.liveness, "gone_reason", gone_reason),
        ):
            assert call(writer, 10, 0) == 10
            assert [call(reader, None, 0) for reader in readers] == [10, 10]
            moments.clear()
            now[0] += waiting.LIVENESS_INTERVAL_S
            # Rank 5 announced that it sleeps for call 1; rank 6 is gone.
            creator.words[member_word(1, PARKED_AT)] = 1 + 1
            fake_proc(creator, 2)
            with pytest.raises(SignalGroupError, match=r"\(rank 6: process 4242 is gone\)$"):
                call(writer, 11, 0)
    finally:
        for ring in reversed(rings):
            ring.close()
    published = pack_slot(1, 11)
    assert moments[0] == ("clock", published, 1)
    assert [what for what, _, _ in moments].count("/proc") == 1
    assert {(word, wakes) for _, word, wakes in moments} == {(published, 1)}


def test_a_reader_asleep_for_this_very_call_is_judged_at_the_next(
    pair: tuple[ShmRing, ShmRing], fake_futex: FakeFutex, fake_proc: Callable[[ShmRing, int], None]
) -> None:
    writer, reader = _ends(pair, timeout=30)
    call(writer, 1, 0)
    assert call(reader, None, 0) == 1
    # The reader announced that it sleeps for call 1, then died there.
    fake_proc(pair[0], 1)
    pair[0].words[member_word(1, PARKED_AT)] = 1 + 1
    _checking_every_call(writer)
    assert call(writer, 2, 0) == 2
    assert fake_futex.wakes == [_sequence_address(pair[0], 1)]
    _checking_every_call(writer)
    with pytest.raises(SignalGroupError, match=r"\(rank 5: process 4242 is gone\)$"):
        call(writer, 3, 0)


@pytest.mark.parametrize("lookahead", [0, 4])
def test_a_dead_reader_fails_a_src_calling_every_few_ms_before_the_ring_fills(
    pair: tuple[ShmRing, ShmRing], lookahead: int
) -> None:
    writer, _ = _ends(pair, lookahead=lookahead, timeout=30)
    _pretend_member_is(pair[0], 1, _gone_pid())
    # Without the src's own liveness look, nothing would fail it before the ring is full and it waits for room.
    with pytest.raises(SignalGroupError, match=r"\(rank 5: process \d+ is gone\)$"):
        for step in range(SHM_RING_SLOTS - 1):
            call(writer, step, 0)
            time.sleep(0.005)


def test_the_src_reads_proc_at_most_every_liveness_interval(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, reader = _ends(pair, timeout=30)
    now = [1000.0]
    judged: list[float] = []

    def gone_reason(peer: liveness.ProcessIdentity) -> None:
        judged.append(now[0])

    with (
        mock.patch.object(shm_transport.time, "monotonic", lambda: now[0]),
        mock.patch.object(shm_transport.liveness, "gone_reason", gone_reason),
    ):
        for step in range(100):
            call(writer, step, 0)
            call(reader, None, 0)
            now[0] += 0.004
    # 100 calls 4 ms apart span 0.4 s: a look every 50 ms. The first, at call 0, needs no /proc read (no value
    # taken yet); each later one reads it once.
    assert len(judged) == 7
    assert all(0.05 <= b - a < 0.054 for a, b in zip([1000.0, *judged], judged, strict=False)), judged


def test_a_live_reader_behind_the_src_fails_nothing(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, _ = _ends(pair, timeout=30)
    for step in range(SHM_RING_SLOTS):
        _checking_every_call(writer)
        assert call(writer, step, 0) == step


def test_readers_that_made_every_call_and_exited_fail_no_src_behind_them(pair: tuple[ShmRing, ShmRing]) -> None:
    """Lookahead 2 over 5 calls: the reader's calls need only the first 3 values, so it may finish first."""
    writer, reader = _ends(pair, lookahead=2, timeout=30)
    for value in (1, 2, 3):
        _checking_every_call(writer)
        call(writer, value, 0)
    assert [call(reader, None, 0) for _ in range(5)] == [INITIAL, INITIAL, 1, 2, 3]
    _pretend_member_is(pair[0], 1, _gone_pid())
    for value in (4, 5):
        _checking_every_call(writer)
        call(writer, value, 0)
    assert pair[0].words[BROKEN_AT // 8] == 0


def test_a_reader_that_takes_a_value_and_exits_while_being_judged_fails_nobody(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, reader = _ends(pair, lookahead=1, timeout=30)
    call(writer, 1, 0)
    call(writer, 2, 0)
    call(reader, None, 0)

    def takes_a_value_then_exits(peer: liveness.ProcessIdentity) -> str:
        # The reader's last two calls land between the src's first look at its cursor and the verdict.
        call(reader, None, 0)
        call(reader, None, 0)
        return "process 4242 is gone"

    _checking_every_call(writer)
    with mock.patch.object(shm_transport.liveness, "gone_reason", takes_a_value_then_exits):
        call(writer, 3, 0)
    assert pair[0].words[BROKEN_AT // 8] == 0


def test_a_mark_left_by_another_member_fails_the_src_right_after_it_publishes(pair: tuple[ShmRing, ShmRing]) -> None:
    writer, reader = _ends(pair, timeout=30)
    pair[0].words[BROKEN_AT // 8] = 7 + 1
    _checking_every_call(writer)
    with pytest.raises(SignalGroupError) as err:
        call(writer, 1, 0)
    assert str(err.value).endswith("a peer exited or dropped its connection (rank 7 exited, as another member found)")
    assert pair[0].words[ring_at(2) // 8] == pack_slot(0, 1)
    # The value stays published: a live reader takes it.
    assert call(reader, None, 0) == 1


# --- the futex phase: announce, look again, sleep; wake only the announced -------------------------------------


@dataclass
class FakeFutex:
    """Stands in for ``futex.Futex``: records waits (with the parked announcement seen at that moment) and wakes;
    ``during_wait`` runs inside each wait (a src publishing meanwhile) and returns what the wait answers."""

    ring: ShmRing | None = None
    during_wait: Callable[[int], str] = lambda calls: "timed out"
    waits: list[tuple[int, int, float, list[int]]] = field(default_factory=list)
    wakes: list[int] = field(default_factory=list)

    def wait(self, address: int, expected: int, seconds: float) -> str:
        parked = [self.ring.words[(members_at(i) + PARKED_AT) // 8] for i in (0, 1)]
        self.waits.append((address, expected, seconds, parked))
        return self.during_wait(len(self.waits))

    def waker(self, address: int, count: int = futex.WAKE_ALL) -> Callable[[], int]:
        assert count == futex.WAKE_ALL
        return lambda: self.wakes.append(address) or 1


@pytest.fixture
def fake_futex(pair: tuple[ShmRing, ShmRing]) -> Iterator[FakeFutex]:
    fake = FakeFutex(pair[0])
    with mock.patch.object(shm_transport.futex, "available", return_value=futex.Support(fake, "fake")):
        yield fake


def _sequence_address(ring: ShmRing, call: int) -> int:
    return ring.address + ring_at(2) + (call % SHM_RING_SLOTS) * 8 + shm_layout.SEQUENCE_HALF_AT


def test_the_mapping_address_is_where_the_words_are(pair: tuple[ShmRing, ShmRing]) -> None:
    creator, _ = pair
    creator.words[ring_at(2) // 8] = (9 << 32) | 5
    assert ctypes.c_uint32.from_address(_sequence_address(creator, 0)).value == 9
    assert PARKED_AT == 32 and MEMBER_BYTES >= PARKED_AT + 8


def test_the_src_wakes_only_for_the_call_a_reader_announced(
    pair: tuple[ShmRing, ShmRing], fake_futex: FakeFutex
) -> None:
    writer, reader = _ends(pair)
    call(writer, 0, 0)
    assert fake_futex.wakes == []
    # Rank 5 announces it may sleep for call 2: call 1 wakes nobody, call 2 wakes its slot.
    pair[0].words[(members_at(1) + PARKED_AT) // 8] = 2 + 1
    call(writer, 1, 0)
    assert fake_futex.wakes == []
    call(writer, 2, 0)
    assert fake_futex.wakes == [_sequence_address(pair[0], 2)]
    # Its own announcement never makes a src wake.
    pair[0].words[(members_at(1) + PARKED_AT) // 8] = 0
    pair[0].words[(members_at(0) + PARKED_AT) // 8] = 3 + 1
    call(writer, 3, 0)
    assert fake_futex.wakes == [_sequence_address(pair[0], 2)]
    assert [call(reader, None, 0) for _ in range(4)] == [0, 1, 2, 3]


def test_a_reader_announces_then_sleeps_on_the_sequence_it_saw_and_the_src_wakes_it(
    pair: tuple[ShmRing, ShmRing], fake_futex: FakeFutex
) -> None:
    writer, reader = _ends(pair)
    call(writer, 5, 0)
    call(reader, None, 0)

    def src_publishes(waits: int) -> str:
        call(writer, 6, 0)
        return "woken"

    fake_futex.during_wait = src_publishes
    assert call(reader, None, 0) == 6
    ((address, expected, seconds, parked),) = fake_futex.waits
    # Slot 1 still held its initial 0 when the reader went to sleep on it (in its own mapping), having announced
    # call 1; the src woke the same slot through its mapping.
    assert (address, expected, parked) == (_sequence_address(pair[1], 1), 0, [0, 1 + 1])
    assert 0 < seconds <= waiting.FUTEX_FIRST_WAIT_S
    assert fake_futex.wakes == [_sequence_address(pair[0], 1)]
    # The announcement is withdrawn once the reader returns.
    assert pair[0].words[(members_at(1) + PARKED_AT) // 8] == 0


@pytest.mark.parametrize("outcome", ["changed", "interrupted", "timed out", "woken"])
def test_a_reader_looks_again_after_any_return_from_its_sleep(
    pair: tuple[ShmRing, ShmRing], fake_futex: FakeFutex, outcome: str
) -> None:
    writer, reader = _ends(pair)

    def publishes_on_the_third(waits: int) -> str:
        if waits == 3:
            call(writer, 8, 0)
        return outcome

    fake_futex.during_wait = publishes_on_the_third
    assert call(reader, None, 0) == 8
    assert len(fake_futex.waits) == 3
    assert {expected for _, expected, _, _ in fake_futex.waits} == {0}
    # Only the first sleep, the one a lost wake-up can hit, is short; the later ones last until the liveness check.
    first, *later = [seconds for _, _, seconds, _ in fake_futex.waits]
    assert 0 < first <= waiting.FUTEX_FIRST_WAIT_S
    assert all(waiting.FUTEX_FIRST_WAIT_S < seconds <= waiting.LIVENESS_INTERVAL_S for seconds in later), later


def test_a_value_that_lands_after_the_last_look_but_before_the_sleep_is_taken_without_sleeping(
    pair: tuple[ShmRing, ShmRing], fake_futex: FakeFutex
) -> None:
    writer, reader = _ends(pair)
    real_wait_until = waiting.wait_until

    def lands_before_park(ready, timeout, find_lost, park, warn):
        assert not ready()
        call(writer, 4, 0)
        park(0.01)
        return real_wait_until(ready, timeout, find_lost, park, warn)

    with mock.patch.object(shm_transport.waiting, "wait_until", lands_before_park):
        assert call(reader, None, 0) == 4
    assert fake_futex.waits == []
    assert pair[0].words[(members_at(1) + PARKED_AT) // 8] == 0


def test_the_announcement_is_withdrawn_when_the_wait_fails(
    pair: tuple[ShmRing, ShmRing], fake_futex: FakeFutex
) -> None:
    _, reader = _ends(pair, timeout=0.05)
    with pytest.raises(TimeoutError):
        call(reader, None, 0)
    assert fake_futex.waits and {parked[1] for *_, parked in fake_futex.waits} == {1}
    assert pair[0].words[(members_at(1) + PARKED_AT) // 8] == 0


def test_without_futex_readers_sleep_in_capped_steps_and_the_src_never_reads_announcements(
    pair: tuple[ShmRing, ShmRing],
) -> None:
    with mock.patch.object(shm_transport.futex, "available", return_value=futex.Support(None, "not Linux")):
        writer, reader = _ends(pair)
    assert writer._parked == [] and reader._futex is None
    parks: list[object] = []
    real_wait_until = waiting.wait_until

    def recording(ready, timeout, find_lost, park, warn):
        parks.append(park)
        return real_wait_until(ready, timeout, find_lost, park, warn)

    late_src = threading.Timer(0.02, lambda: call(writer, 3, 0))
    late_src.start()
    with mock.patch.object(shm_transport.waiting, "wait_until", recording):
        assert call(reader, None, 0) == 3
    late_src.join()
    assert parks == [None]


def test_a_real_futex_wakes_a_reader_thread_on_another_mapping(pair: tuple[ShmRing, ShmRing]) -> None:
    real = futex.available().futex
    wakes: list[int] = []
    waits: list[str] = []

    class Counting:
        def wait(self, address: int, expected: int, seconds: float) -> str:
            waits.append(real.wait(address, expected, seconds))
            return waits[-1]

        def waker(self, address: int, count: int = futex.WAKE_ALL) -> Callable[[], int]:
            wake = real.waker(address, count)
            return lambda: wakes.append(address) or wake()

    with mock.patch.object(shm_transport.futex, "available", return_value=futex.Support(Counting(), "counting")):
        writer, reader = _ends(pair, timeout=30)
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(call(reader, None, 0)))
    thread.start()
    # Long past spin and yield: the reader has announced and sleeps in the kernel.
    deadline = time.monotonic() + 20
    while pair[0].words[(members_at(1) + PARKED_AT) // 8] != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    call(writer, -9, 0)
    thread.join(30)
    assert got == [-9]
    assert wakes == [_sequence_address(pair[0], 0)] and waits
