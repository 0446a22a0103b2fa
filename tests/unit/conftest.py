"""Fakes shared by the mocked unit tests: no real process group, store or rank is ever started here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from paddle.distributed.communication.group import Group

from fastdeploy_patch import signal_group
from fastdeploy_patch.paddle_internals import paddle_private


@pytest.fixture(autouse=True)
def _fresh_private_cache() -> Iterator[None]:
    # paddle_private caches what it resolves; a stub cached by one test must not leak into the next.
    paddle_private.cache_clear()
    yield
    paddle_private.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_signal_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test starts as a fresh worker: no signal group created yet, so rendezvous keys start at 1.
    monkeypatch.setattr(signal_group, "_SIGNAL_GROUPS", {})
    monkeypatch.setattr(signal_group, "_created", 0)


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


@dataclass
class FakeGlobalStore:
    """Paddle's global TCP store as the signal group uses it: set/get of string values."""

    values: dict[str, bytes] = field(default_factory=dict)
    sets: list[tuple[str, str]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)

    def set(self, key: str, value: str) -> None:
        self.sets.append((key, value))
        self.values[key] = value.encode()

    def get(self, key: str) -> list[int]:
        # The real store hands the value back as a list of byte values.
        self.gets.append(key)
        return list(self.values[key])


@dataclass
class FakeTCPStore:
    """Stands in for ``core.TCPStore``; records how it was opened."""

    host: str
    port: int
    is_master: bool
    num_workers: int
    timeout: int
