"""Two hosts simulated on one machine: 4 ranks as two "hosts" of 2, each host a network namespace (joined to the
other by a veth pair) with a private /dev/shm (a mount namespace with a fresh tmpfs).

``auto`` must pick gloo for the group of all 4 ranks (no segment can be mapped across hosts) and broadcast
correctly across, while the group of the 2 ranks inside one host must pick shared memory. Needs root and the
``ip``, ``unshare`` and ``nsenter`` commands; skipped, with the reason, without them. Only the two namespace
addresses below and loopback are used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.signal_group.shm_segment import SEGMENT_PREFIX
from fastdeploy_patch.testing.launcher import RankPlacement
from tests.distributed.harness import RUN_TAG, RUN_TAG_VAR, run_ranks_or_fail

HOST_ADDRESSES = ("10.231.0.1", "10.231.0.2")
PREFIX_LENGTH = 24
RANKS_PER_HOST = 2
STEPS = 300
HOLDER_SCRIPT = "mount -t tmpfs -o size=16m tmpfs /dev/shm && exec sleep infinity"
HOLDER_READY_S = 20.0
"""How long a host's holder process may take to mount its /dev/shm; a bound against a hang only."""


@dataclass
class SimulatedHost:
    """One "host": a network namespace with one end of the veth pair, and a holder process that keeps a mount
    namespace with a private tmpfs on /dev/shm; ranks join both namespaces through ``nsenter``."""

    namespace: str
    veth: str
    address: str
    holder: subprocess.Popen

    def shm_segments(self) -> list[str]:
        """The signal segments in this host's private /dev/shm, seen through its holder's root."""
        shm = Path(procfs.root_path(self.holder.pid, "/dev/shm"))
        return sorted(p.name for p in shm.iterdir() if p.name.startswith(SEGMENT_PREFIX))

    def placement(self) -> RankPlacement:
        enter = ("nsenter", f"--target={self.holder.pid}", "--mount", "--net", f"--wd={os.getcwd()}", "--")
        # Paddle's gloo binds to the address the hostname resolves to (loopback here) unless told the interface.
        return RankPlacement(self.address, enter, {"GLOO_SOCKET_IFNAME": self.veth})


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _check(*argv: str) -> None:
    done = _run(*argv)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def _missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network and mount namespaces"
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    return f"needs the {', '.join(missing)} command(s)" if missing else None


def _start_holder(namespace: str) -> subprocess.Popen:
    """Start the process that keeps one host's mount namespace (a private /dev/shm) alive inside ``namespace``."""
    # ip netns exec, unshare and sh each exec the next, so the holder's pid ends up as `sleep` inside both
    # namespaces once the tmpfs is mounted.
    unshare = ("unshare", "--mount", "--propagation", "private")
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, *unshare, "sh", "-c", HOLDER_SCRIPT],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, RUN_TAG_VAR: RUN_TAG},
    )


def _wait_until_mounted(holder: subprocess.Popen, namespace: str) -> None:
    deadline = time.monotonic() + HOLDER_READY_S
    while (now := procfs.stat(holder.pid)) is None or now.comm != "sleep":
        if holder.poll() is not None:
            raise RuntimeError(f"the holder of {namespace} exited ({holder.returncode}): {holder.stderr.read()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the holder of {namespace} did not mount /dev/shm within {HOLDER_READY_S:g} s")
        time.sleep(0.02)


@pytest.fixture
def two_hosts() -> Iterator[list[SimulatedHost]]:
    reason = _missing_requirement()
    if reason:
        pytest.skip(f"two simulated hosts: {reason}")
    tag = uuid.uuid4().hex[:6]
    namespaces = [f"fdp-{tag}-a", f"fdp-{tag}-b"]
    veths = [f"fdp{tag}a", f"fdp{tag}b"]  # interface names are at most 15 characters
    created: list[str] = []
    holders: list[subprocess.Popen] = []
    try:
        for namespace in namespaces:
            done = _run("ip", "netns", "add", namespace)
            if done.returncode != 0 and not created and "Operation not permitted" in done.stderr:
                pytest.skip(f"two simulated hosts: cannot create a network namespace: {done.stderr.strip()}")
            if done.returncode != 0:
                raise RuntimeError(f"ip netns add {namespace} failed: {done.stderr.strip()}")
            created.append(namespace)
        veth_pair = ("type", "veth", "peer", "name", veths[1], "netns", namespaces[1])
        _check("ip", "-n", namespaces[0], "link", "add", veths[0], *veth_pair)
        hosts = []
        for namespace, veth, address in zip(namespaces, veths, HOST_ADDRESSES, strict=True):
            _check("ip", "-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", veth)
            _check("ip", "-n", namespace, "link", "set", veth, "up")
            _check("ip", "-n", namespace, "link", "set", "lo", "up")
            holders.append(_start_holder(namespace))
            _wait_until_mounted(holders[-1], namespace)
            hosts.append(SimulatedHost(namespace, veth, address, holders[-1]))
        yield hosts
    finally:
        for holder in holders:
            with contextlib.suppress(ProcessLookupError):
                holder.send_signal(signal.SIGKILL)
            holder.wait()
        for namespace in created:
            # Deleting a namespace also deletes the veth end inside it, and so the pair.
            _check("ip", "netns", "delete", namespace)
        left = _run("ip", "netns", "list").stdout
        assert not any(namespace in left for namespace in namespaces), f"namespaces left behind: {left}"


def two_hosts_rank(steps: int) -> dict:
    """On one rank: a signal group over all 4 ranks and one per host (created collectively by every rank), then
    ``steps`` broadcasts on each, from a src that changes every step."""
    import paddle.distributed as dist

    from fastdeploy_patch import broadcast_signal, new_signal_group

    rank = dist.get_rank()
    world = new_signal_group()
    per_host = [new_signal_group(list(range(h * RANKS_PER_HOST, (h + 1) * RANKS_PER_HOST))) for h in range(2)]
    local = per_host[rank // RANKS_PER_HOST]
    across = [broadcast_signal(1000 * step + rank, src=step % 4, group=world) for step in range(steps)]
    within = [
        broadcast_signal(-step - rank, src=local.ranks[step % RANKS_PER_HOST], group=local) for step in range(steps)
    ]
    refused = {}
    # Collective and refused on every rank alike: shm forced across hosts, and auto with what only shm can give.
    for name, kwargs in {"shm": {"transport": "shm"}, "auto_long_timeout": {"timeout": 60}}.items():
        try:
            new_signal_group(**kwargs)
        except (RuntimeError, ValueError) as exc:
            refused[name] = f"{type(exc).__name__}: {exc}"
    result = {
        "rank": rank,
        "refused": refused,
        "world": [world.transport, world.ranks],
        "local": [local.transport, local.ranks],
        "across": across,
        "within": within,
        "shm_device": os.stat("/dev/shm").st_dev,
        "endpoint": os.environ["PADDLE_CURRENT_ENDPOINT"],
    }
    for group in (world, local):
        group.close()
    return result


@pytest.mark.timeout(240)
def test_auto_picks_gloo_across_hosts_and_shm_within_one(two_hosts: list[SimulatedHost]) -> None:
    placements = [host.placement() for host in two_hosts for _ in range(RANKS_PER_HOST)]
    results = run_ranks_or_fail(two_hosts_rank, 4, kwargs={"steps": STEPS}, placements=placements, timeout=150)
    for r in results:
        print(
            f"rank {r['rank']} at {r['endpoint']}: all 4 ranks -> {r['world'][0]}, "
            f"ranks {r['local'][1]} -> {r['local'][0]}, /dev/shm device {r['shm_device']}"
        )
    for name, message in results[0]["refused"].items():
        print(f"rank 0, {name}: {message}")
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    for r in results:
        host = r["rank"] // RANKS_PER_HOST
        assert r["endpoint"].startswith(f"{HOST_ADDRESSES[host]}:")
        assert r["world"] == ["gloo", [0, 1, 2, 3]]
        assert r["local"] == ["shm", [2 * host, 2 * host + 1]]
        assert r["across"] == [1000 * step + step % 4 for step in range(STEPS)]
        assert r["within"] == [-step - (2 * host + step % 2) for step in range(STEPS)]
    cannot = "ranks [2, 3] of the signal group (ranks [0, 1, 2, 3]) cannot map its shared-memory segment"
    for r in results:
        assert r["refused"]["shm"].startswith(f"RuntimeError: {cannot}"), r["refused"]
        assert r["refused"]["shm"].endswith("transport='shm' needs every member on one host with a usable /dev/shm")
        assert r["refused"]["auto_long_timeout"].startswith(f"ValueError: {cannot}"), r["refused"]
        assert "so transport='auto' falls back to gloo" in r["refused"]["auto_long_timeout"]
    # Nothing left in either host's own /dev/shm, refused groups included.
    for host in two_hosts:
        assert host.shm_segments() == [], host.namespace
    # Each host has a /dev/shm of its own, shared by its two ranks, unlike this process's.
    devices = [r["shm_device"] for r in results]
    assert devices[0] == devices[1] != devices[2] == devices[3]
    assert os.stat("/dev/shm").st_dev not in devices
