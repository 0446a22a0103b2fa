"""StatusSignal on real (one int32) shared memory: who creates, who attaches, who unlinks."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker, shared_memory
from unittest import mock

import pytest

from fastdeploy_patch import ipc_signal
from fastdeploy_patch.ipc_signal import StatusSignal


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def _attach(name: str) -> StatusSignal:
    """Attach as a worker would, in the process that also owns the segment.

    The tracker keeps one entry per name, so the attacher's unregister also drops the owner's entry, and the
    owner's unlink would then make the tracker print a KeyError. Real workers attach from other processes; put
    the owner's entry back so the owner's cleanup stays quiet and tracked.
    """
    worker = StatusSignal(name)
    resource_tracker.register(f"/{name}", "shared_memory")
    return worker


@pytest.fixture
def name() -> Iterator[str]:
    segment = f"fdp_unit_{uuid.uuid4().hex[:12]}"
    yield segment
    # A failed test must not leave the segment behind.
    if _exists(segment):
        leftover = shared_memory.SharedMemory(name=segment)
        leftover.close()
        leftover.unlink()


def test_the_owner_creates_the_segment_with_its_initial_value(name: str) -> None:
    owner = StatusSignal(name, create=True, initial=-1)
    try:
        assert owner.owner is True and owner.name == name and _exists(name)
        assert owner.value.dtype.name == "int32" and owner.value.shape == (1,)
        assert owner.value[0] == -1
    finally:
        owner.close()


def test_an_attacher_shares_the_value_and_does_not_reset_it(name: str) -> None:
    with StatusSignal(name, create=True, initial=5) as owner:
        worker = _attach(name)
        try:
            assert worker.owner is False and worker.name == name
            assert worker.value[0] == 5
            owner.value[0] = -2
            assert worker.value[0] == -2
            worker.value[0] = 1
            assert owner.value[0] == 1
        finally:
            worker.close()


def test_only_the_attacher_is_unregistered_from_the_resource_tracker(name: str) -> None:
    with mock.patch.object(ipc_signal.resource_tracker, "unregister", wraps=resource_tracker.unregister) as spy:
        owner = StatusSignal(name, create=True)
        spy.assert_not_called()
        worker = StatusSignal(name)
        spy.assert_called_once_with(f"/{name}", "shared_memory")
    resource_tracker.register(f"/{name}", "shared_memory")
    worker.close()
    owner.close()


def test_an_attacher_closing_leaves_the_segment_to_the_owner(name: str) -> None:
    owner = StatusSignal(name, create=True, initial=3)
    worker = _attach(name)
    worker.close()
    assert _exists(name)
    again = _attach(name)
    assert again.value[0] == 3
    again.close()
    owner.close()


def test_the_owner_closing_unlinks_the_segment(name: str) -> None:
    owner = StatusSignal(name, create=True)
    owner.close()
    assert not _exists(name)
    with pytest.raises(FileNotFoundError):
        StatusSignal(name)


def test_close_twice_is_harmless(name: str) -> None:
    owner = StatusSignal(name, create=True)
    worker = _attach(name)
    worker.close()
    worker.close()
    with mock.patch.object(owner._shm, "unlink", wraps=owner._shm.unlink) as unlink:
        owner.close()
        owner.close()
    unlink.assert_called_once_with()
    assert not _exists(name)


def test_the_context_manager_closes_and_unlinks(name: str) -> None:
    with StatusSignal(name, create=True) as owner:
        assert isinstance(owner, StatusSignal) and _exists(name)
    assert not _exists(name)


def test_an_unnamed_owner_gets_a_name_workers_can_attach_to() -> None:
    with StatusSignal(create=True, initial=1) as owner:
        name = owner.name
        assert name and _exists(name)
        with _attach(name) as worker:
            assert worker.value[0] == 1
    assert not _exists(name)


def test_attaching_needs_a_name() -> None:
    with pytest.raises(ValueError, match=r"^name is required to attach to an existing status signal$"):
        StatusSignal()
