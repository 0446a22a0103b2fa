"""What makes N rank processes one Paddle world: free ports claimed for them, where each rank runs
(``RankPlacement``), and the environment Paddle reads to join (``rank_env``), on CPUs with gloo or on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
DEVICES = {"cpu": "gloo", "gpu": "nccl"}
"""The default backend of a world on each kind of device."""
PORT_CLAIM_PREFIX = "fdp-port-"
"""Abstract Unix socket names (``\\0fdp-port-<port>``) through which test processes claim the ports they hand
their ranks."""


@dataclass(frozen=True)
class RankPlacement:
    """Where and how one rank runs: its endpoint's address, a command its interpreter is started through (for
    example ``nsenter`` into another host's namespaces; it must exec the interpreter, not fork it, so that killing
    the rank reaches it), and environment variables for it alone."""

    host: str = LOOPBACK
    command_prefix: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def free_ports(count: int, claims: contextlib.ExitStack, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that were free a moment ago, each claimed for as long as ``claims`` stays
    open: the claim is an abstract Unix socket named after the port, which every process choosing ports here tries
    to bind first, so test processes side by side (xdist workers, a CLI a test started) never hand their ranks the
    same port, however the kernel hands ports out. A claim ends with its process, however that dies, and leaves no
    file behind."""
    ports: list[int] = []
    with contextlib.ExitStack() as probes:
        while len(ports) < count:
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            # Held until every port is chosen: the kernel hands out another port each time.
            probe.bind((host, 0))
            port = probe.getsockname()[1]
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                claim.bind(f"\0{PORT_CLAIM_PREFIX}{port}")
            except OSError:
                claim.close()  # another test process's ranks have this port
                continue
            claims.enter_context(claim)
            ports.append(port)
    return ports


WORLD_VARS = (
    "PADDLE_TRAINER_ID",
    "PADDLE_TRAINERS_NUM",
    "PADDLE_TRAINER_ENDPOINTS",
    "PADDLE_CURRENT_ENDPOINT",
    "PADDLE_MASTER",
    "PADDLE_DISTRI_BACKEND",
    "PADDLE_RANK_IN_NODE",
    "FLAGS_selected_gpus",
)
"""Every variable ``rank_env`` may set: they name one rank of one world."""


def rank_env(
    rank: int, nranks: int, ports: list[int], *, backend: str = "gloo", hosts: Sequence[str] | None = None
) -> dict[str, str]:
    """The environment variables Paddle reads to join rank ``rank`` of ``nranks``: rank ``r`` listens on
    ``hosts[r]:ports[r]`` (every host is loopback by default) and the master on ``hosts[0]:ports[nranks]``. With
    ``backend="nccl"`` rank ``r`` uses GPU ``r`` (``FLAGS_selected_gpus``); with gloo no GPU is visible."""
    hosts = hosts or [LOOPBACK] * nranks
    endpoints = [f"{host}:{port}" for host, port in zip(hosts, ports[:nranks], strict=True)]
    env = {
        "PADDLE_TRAINER_ID": str(rank),
        "PADDLE_TRAINERS_NUM": str(nranks),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
        "PADDLE_MASTER": f"{hosts[0]}:{ports[nranks]}",
        "PADDLE_DISTRI_BACKEND": backend,
        "PADDLE_RANK_IN_NODE": str(rank),
    }
    if backend == "nccl":
        env["FLAGS_selected_gpus"] = str(rank)
    else:
        # A CPU run must not touch a GPU even on a machine that has one.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check_devices(devices: object) -> str:
    """``devices`` if it is ``"cpu"`` or ``"gpu"``; ``ValueError`` naming it otherwise."""
    if devices not in DEVICES:
        raise ValueError(f"devices must be 'cpu' or 'gpu', got {devices!r}")
    return devices  # type: ignore[return-value]
