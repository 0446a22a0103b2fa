"""Fakes shared by the mocked unit tests: no real process group, store or rank is ever started here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from paddle.distributed.communication.group import Group

from fastdeploy_patch.paddle_internals import paddle_private
from fastdeploy_patch.signal_group import group as signal_group_api
from fastdeploy_patch.signal_group.shm_segment import ShmRing


@pytest.fixture(autouse=True)
def _fresh_private_cache() -> Iterator[None]:
    # paddle_private caches what it resolves; a stub cached by one test must not leak into the next.
    paddle_private.cache_clear()
    yield
    paddle_private.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_signal_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test starts as a fresh worker: no signal group created yet, so rendezvous keys start at 1, and none
    # failed. The global store's connection counts as sped up already: no /proc scan unless a test asks for it.
    monkeypatch.setattr(signal_group_api, "_created", 0)
    monkeypatch.setattr(signal_group_api, "_failed", None)
    monkeypatch.setattr(signal_group_api, "_store_without_delay", True)


@dataclass
class ShutdownablePG:
    """A process group with a working ``shutdown`` (NCCL-like); records calls, optionally fails."""

    fail_with: BaseException | None = None
    shutdowns: int = 0
    restarts: int = 0

    def shutdown(self) -> None:
        self.shutdowns += 1
        if self.fail_with is not None:
            raise self.fail_with

    def restart(self) -> None:
        self.restarts += 1


class GlooLikePG:
    """A process group without ``shutdown``, like Paddle 3.3's ProcessGroupGloo."""


@dataclass
class NonCallableShutdownPG:
    """A process group whose ``shutdown`` attribute exists but cannot be called."""

    shutdown: object = None


def make_group(name: str, gid: int, pg: object, ranks: list[int] | None = None, rank: int = 0) -> Group:
    """A real Paddle ``Group`` record around a fake backend, as Paddle's registry holds them."""
    return Group(rank, gid, ranks if ranks is not None else [0, 1], pg=pg, name=name)


PEERS_DONE = 1000
"""What a creation's count of the ranks done with a step reads as, on top of this rank's own: more than any world."""


@dataclass
class FakeGlobalStore:
    """Paddle's global TCP store as the signal group uses it: set/get of string values, and counts. Unless
    ``peers_done`` is 0, every other rank has done every step of every creation already (a count of the ranks done
    with a step reads as ``PEERS_DONE`` more than this rank's own); a rank's own count and the failure count do not."""

    values: dict[str, bytes] = field(default_factory=dict)
    sets: list[tuple[str, str]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    adds: list[tuple[str, int]] = field(default_factory=list)
    peers_done: int = PEERS_DONE

    def set(self, key: str, value: str) -> None:
        self.sets.append((key, value))
        self.values[key] = value.encode()

    def get(self, key: str) -> list[int]:
        # The real store hands the value back as a list of byte values.
        self.gets.append(key)
        return list(self.values[key])

    def add(self, key: str, amount: int) -> int:
        """Add to a counter (see the class's docstring for what the other ranks added)."""
        self.adds.append((key, amount))
        self.counters[key] = self.counters.get(key, 0) + amount
        step = key.partition("/count/")[2]
        if step and step != "failures" and not step.rpartition("/")[2].isdigit():
            return self.counters[key] + self.peers_done
        return self.counters[key]


@dataclass
class FakeTCPStore:
    """Stands in for ``core.TCPStore``; records how it was opened."""

    host: str
    port: int
    is_master: bool
    num_workers: int
    timeout: int


@pytest.fixture(autouse=True)
def _no_segment_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Only the segments this test created count: another process on the host (a distributed run, another
    # checkout's tests) may own live fdp_signal_ segments, and those are neither ours to judge nor to remove.
    created: list[str] = []
    real_create = ShmRing.create.__func__

    def recording_create(cls: type[ShmRing], *args: object, **kwargs: object) -> ShmRing:
        ring = real_create(cls, *args, **kwargs)
        created.append(ring.path)
        return ring

    monkeypatch.setattr(ShmRing, "create", classmethod(recording_create))
    yield
    leaked = [path for path in created if os.path.exists(path)]
    for path in leaked:
        os.unlink(path)
    assert not leaked, f"shared-memory segments leaked: {sorted(leaked)}"
