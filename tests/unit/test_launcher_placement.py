"""fastdeploy_patch.testing.launcher's rank placements: per-rank addresses, command prefixes and environment.

The multi-rank cases run against a fake Popen; one real one-rank run proves a prefix really starts the rank.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastdeploy_patch.testing import launcher, rank_processes
from fastdeploy_patch.testing.launcher import RankPlacement, rank_env, run_ranks
from tests.unit.test_launcher import fake_sentinels

REPO = Path(__file__).resolve().parents[2]


def test_rank_env_puts_each_rank_on_its_host_and_the_master_on_rank_0s() -> None:
    hosts = ["10.231.0.1", "10.231.0.1", "10.231.0.2", "10.231.0.2"]
    env = rank_env(2, 4, [7001, 7002, 7003, 7004, 7005], hosts=hosts)
    assert env["PADDLE_TRAINER_ENDPOINTS"] == "10.231.0.1:7001,10.231.0.1:7002,10.231.0.2:7003,10.231.0.2:7004"
    assert env["PADDLE_CURRENT_ENDPOINT"] == "10.231.0.2:7003"
    assert env["PADDLE_MASTER"] == "10.231.0.1:7005"
    assert (env["PADDLE_TRAINER_ID"], env["PADDLE_TRAINERS_NUM"]) == ("2", "4")


def test_rank_env_defaults_every_host_to_loopback() -> None:
    assert rank_env(0, 2, [1, 2, 3]) == rank_env(0, 2, [1, 2, 3], hosts=["127.0.0.1", "127.0.0.1"])
    assert RankPlacement() == RankPlacement(host="127.0.0.1", command_prefix=(), env={})


class RecordingPopen:
    """Starts nothing: records each rank's command and environment, and exits 0 with a result at once."""

    started: list[RecordingPopen]

    def __init__(self, argv, *, env, stdout, **kwargs) -> None:
        self.argv, self.env, self.kwargs = argv, env, kwargs
        self.pid = 5000 + len(RecordingPopen.started)
        RecordingPopen.started.append(self)

    def poll(self) -> int:
        Path(self.argv[-1]).write_text(json.dumps(int(self.env["PADDLE_TRAINER_ID"])))
        return 0

    def wait(self, timeout=None) -> int:
        return 0


@pytest.fixture
def popen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    RecordingPopen.started = []
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(rank_processes.subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(rank_processes.os, "killpg", lambda pid, sig: signalled.append((pid, sig)))
    monkeypatch.setattr(rank_processes, "KILL_GRACE_S", 0.01)
    with fake_sentinels(monkeypatch):
        yield signalled


def test_each_rank_gets_its_host_prefix_and_environment(popen, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "free_ports", lambda count, claims: [7001, 7002, 7003])
    placements = [
        RankPlacement("10.231.0.1", ("nsenter", "--target=11", "--"), {"GLOO_SOCKET_IFNAME": "vetha", "X": "a"}),
        RankPlacement("10.231.0.2", ("nsenter", "--target=22", "--"), {"GLOO_SOCKET_IFNAME": "vethb"}),
    ]
    results = run_ranks("pkg.mod:fn", 2, env={"X": "shared", "Y": "y"}, placements=placements, poll_interval=0)
    assert results == [0, 1]
    first, second = RecordingPopen.started
    assert first.argv[:6] == ["nsenter", "--target=11", "--", sys.executable, "-c", launcher.RANK_BOOTSTRAP]
    assert second.argv[:3] == ["nsenter", "--target=22", "--"]
    # A placement's own variables win over the shared ones; Paddle's are the launcher's alone.
    assert (first.env["GLOO_SOCKET_IFNAME"], first.env["X"], first.env["Y"]) == ("vetha", "a", "y")
    assert (second.env["GLOO_SOCKET_IFNAME"], second.env["X"]) == ("vethb", "shared")
    assert first.env["PADDLE_TRAINER_ENDPOINTS"] == "10.231.0.1:7001,10.231.0.2:7002"
    assert second.env["PADDLE_CURRENT_ENDPOINT"] == "10.231.0.2:7002"
    assert first.env["PADDLE_MASTER"] == second.env["PADDLE_MASTER"] == "10.231.0.1:7003"
    # Placed ranks are still killed by session, like any rank.
    assert sorted(popen) == sorted((pid, sig) for pid in (5000, 5001) for sig in (signal.SIGTERM, signal.SIGKILL))


@pytest.mark.parametrize("count", [1, 3])
def test_placements_must_be_one_per_rank(popen, count: int) -> None:
    message = f"placements must hold one RankPlacement per rank (2), got {count}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        run_ranks("pkg.mod:fn", 2, placements=[RankPlacement()] * count)
    assert RecordingPopen.started == []


def test_a_real_rank_starts_through_its_command_prefix() -> None:
    # `env NAME=VALUE cmd` execs cmd, as nsenter does: the rank is the prefix's process.
    placement = RankPlacement(command_prefix=("env", "FDP_VIA_PREFIX=yes"), env={"FDP_OWN": "mine"})
    [result] = run_ranks(
        "tests.unit.rank_targets:environment",
        1,
        kwargs={"names": ["FDP_VIA_PREFIX", "FDP_OWN", "PADDLE_CURRENT_ENDPOINT"]},
        env={"PYTHONPATH": str(REPO)},
        placements=[placement],
        timeout=120,
    )
    assert result["FDP_VIA_PREFIX"] == "yes" and result["FDP_OWN"] == "mine"
    assert result["PADDLE_CURRENT_ENDPOINT"].startswith("127.0.0.1:")
