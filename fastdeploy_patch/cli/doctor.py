"""``fastdeploy-patch doctor``: what a user on a new box needs to know before running signal groups there.

Each check turns facts about this machine into one finding: OK, WARN (works, but read this) or FAIL (the signal
group cannot work). The facts are gathered by small functions kept apart from the checks, so that every branch
can be tested with made-up facts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fastdeploy_patch import procfs
from fastdeploy_patch.signal_group import SEGMENT_PREFIX
from fastdeploy_patch.signal_group.shm_diagnostics import Leftover

OK, WARN, FAIL = "OK", "WARN", "FAIL"

MIB = 2**20
GIB = 2**30

SHM_SMALL_BYTES = 1 * GIB
"""Below this, warn about /dev/shm's size. The signal ring itself takes a few KB, but NCCL and the engine's own
IPC use /dev/shm too, and Docker's default of 64 MB is a known cause of failures there (vLLM now refuses to start
below its own limit)."""

SHM_LOW_FREE_BYTES = 16 * MIB
"""Below this much free space in /dev/shm, warn: creating a segment may fail with ENOSPC."""

SYS_CLASS_NET = "/sys/class/net"


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``level`` is OK, WARN or FAIL."""

    level: str
    topic: str
    text: str


@dataclass(frozen=True)
class PaddleFacts:
    version: str
    cuda: str | None
    """The CUDA version Paddle was built with; None for a CPU build."""
    has_gloo: bool
    gpus: int


def paddle_finding(facts: PaddleFacts) -> Finding:
    """Paddle's version and build. gloo missing is a warning: shared memory alone serves ranks on one host."""
    build = f"GPU build (CUDA {facts.cuda})" if facts.cuda else "CPU build"
    if facts.has_gloo:
        return Finding(OK, "Paddle", f"{facts.version}, {build}, gloo: yes")
    return Finding(
        WARN,
        "Paddle",
        f"{facts.version}, {build}, gloo: NO. Ranks on one host can still use shared memory; ranks on several hosts "
        "cannot sync (the gloo transport needs a Paddle wheel built with gloo, as the official ones are)",
    )


def gpu_finding(facts: PaddleFacts, visible: str | None) -> Finding:
    """How many GPUs Paddle sees, and what ``CUDA_VISIBLE_DEVICES`` restricts it to."""
    mask = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if not facts.cuda:
        return Finding(OK, "GPUs", f"none used: a CPU build of Paddle{mask}")
    return Finding(OK, "GPUs", f"{facts.gpus} seen{mask}")


@dataclass(frozen=True)
class ShmFacts:
    path: str
    is_dir: bool
    fs_type: str | None
    """The filesystem mounted exactly at ``path``; None when ``path`` is no mount point of its own."""
    size: int
    free: int


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.0f} MiB"


def shm_findings(facts: ShmFacts) -> list[Finding]:
    """Whether /dev/shm is there and a tmpfs, and its size and free space."""
    topic = facts.path
    if not facts.is_dir:
        return [Finding(WARN, topic, "missing: ranks cannot share memory, so they fall back to gloo")]
    if facts.fs_type is None:
        mounted = Finding(WARN, topic, "not a mount point of its own: segments go to the filesystem below it")
    elif facts.fs_type != "tmpfs":
        mounted = Finding(WARN, topic, f"mounted as {facts.fs_type}, not tmpfs: segments may touch a disk")
    else:
        mounted = Finding(OK, topic, "mounted (tmpfs)")
    space = f"{_size(facts.size)}, {_size(facts.free)} free"
    if facts.size < SHM_SMALL_BYTES:
        sized = Finding(
            WARN,
            topic,
            f"{space}: small (Docker's default is 64 MB). The signal ring needs a few KB, but NCCL and the engine "
            "use /dev/shm too: give the container --shm-size=1g or more (or --ipc=host)",
        )
    elif facts.free < SHM_LOW_FREE_BYTES:
        sized = Finding(WARN, topic, f"{space}: almost full; look for leftover segments there")
    else:
        sized = Finding(OK, topic, space)
    return [mounted, sized]


@dataclass(frozen=True)
class LeftoverFacts:
    found: Sequence[Leftover]
    """This package's segments whose creator is gone (``leftover_segments()``)."""
    removed: Mapping[str, str | None] | None
    """With ``--clean``: each found path, mapped to None once removed, else to why it could not be; None without."""


def leftover_finding(facts: LeftoverFacts) -> Finding:
    """The signal-group segments nobody can use any more, because the process that created them is gone (a
    creator killed in the handshake whose resource tracker died with it); with ``--clean``, what was removed."""
    topic = "leftover segments"
    pattern = f"{SEGMENT_PREFIX}*"
    if not facts.found:
        return Finding(OK, topic, f"none: no {pattern} segment whose creator is gone")
    listed = ", ".join(f"{os.path.basename(found.path)} ({found.reason})" for found in facts.found)
    count = len(facts.found)
    if facts.removed is None:
        return Finding(
            WARN,
            topic,
            f"{count} {pattern} segment(s) whose creator is gone: {listed}. `fastdeploy-patch doctor --clean` "
            "removes them, and only them",
        )
    failed = [f"{path}: {why}" for path, why in facts.removed.items() if why is not None]
    if not failed:
        return Finding(OK, topic, f"removed {count} {pattern} segment(s) whose creator was gone: {listed}")
    return Finding(
        WARN,
        topic,
        f"removed {count - len(failed)} of {count} {pattern} segment(s) whose creator was gone; could not remove "
        + "; ".join(failed),
    )


def transport_finding(shm_error: OSError | None, has_gloo: bool) -> Finding:
    """Which transport ``new_signal_group(transport="auto")`` picks for ranks on this host; FAIL when neither
    works."""
    topic = "ranks on this host"
    if shm_error is None:
        return Finding(OK, topic, 'transport="auto" picks shm (shared memory works here)')
    why = shm_error.strerror or str(shm_error)
    if has_gloo:
        return Finding(
            WARN,
            topic,
            f'transport="auto" falls back to gloo (timeouts up to 30 s, no lookahead): shared memory fails: {why}',
        )
    return Finding(FAIL, topic, f"no transport works: shared memory fails ({why}) and this Paddle has no gloo")


def reader_sleep_finding(kind: str, detail: str) -> Finding:
    """How a shared-memory reader that has waited past its spin and yield phases sleeps (``shm_reader_sleep()``):
    a futex wait, woken by the src's publish, or else capped sleeps, which see a value up to about 1 ms late."""
    topic = "shm reader wait"
    if kind == "futex":
        return Finding(OK, topic, f"futex: a reader that waited long is woken by the src's publish ({detail})")
    return Finding(
        WARN,
        topic,
        f"{kind}: a reader that waited long sees a value up to about 1 ms late, because futex is unavailable: "
        f"{detail}",
    )


@dataclass(frozen=True)
class NetworkFacts:
    ifname: str | None
    """GLOO_SOCKET_IFNAME, when set."""
    interfaces: Sequence[str]
    hostname: str
    address: str | None
    """What ``hostname`` resolves to; None when it does not resolve."""


def multi_host_finding(facts: NetworkFacts) -> Finding:
    """What gloo binds to when ranks span hosts: the interface GLOO_SOCKET_IFNAME names, else the address the
    hostname resolves to (Paddle's gloo default), which is often loopback."""
    topic = "ranks on several hosts"
    if facts.ifname is not None:
        if facts.ifname not in facts.interfaces:
            return Finding(
                FAIL,
                topic,
                f"GLOO_SOCKET_IFNAME={facts.ifname!r} names no interface here (have: {', '.join(facts.interfaces)}): "
                "gloo cannot bind",
            )
        return Finding(OK, topic, f"gloo binds to interface {facts.ifname} (GLOO_SOCKET_IFNAME)")
    resolved = facts.address or "nothing"
    loopback = " (loopback: other hosts cannot reach it)" if (facts.address or "").startswith("127.") else ""
    return Finding(
        WARN,
        topic,
        f"GLOO_SOCKET_IFNAME is not set, so gloo binds to the address hostname {facts.hostname!r} resolves to: "
        f"{resolved}{loopback}. Set GLOO_SOCKET_IFNAME to the interface the hosts reach each other on, on every rank",
    )


def diagnose(
    paddle: PaddleFacts,
    visible: str | None,
    shm: ShmFacts,
    shm_error: OSError | None,
    reader_sleep: tuple[str, str],
    network: NetworkFacts,
    leftovers: LeftoverFacts,
) -> list[Finding]:
    """Every finding, in report order."""
    return [
        paddle_finding(paddle),
        gpu_finding(paddle, visible),
        *shm_findings(shm),
        leftover_finding(leftovers),
        transport_finding(shm_error, paddle.has_gloo),
        reader_sleep_finding(*reader_sleep),
        multi_host_finding(network),
    ]


def format_findings(findings: Sequence[Finding]) -> str:
    """The report: one line per finding, then the verdict."""
    lines = [f"[{f.level:^4}] {f.topic}: {f.text}" for f in findings]
    failures = sum(f.level == FAIL for f in findings)
    warnings = sum(f.level == WARN for f in findings)
    if failures:
        lines.append(f"doctor: the signal group cannot work here ({failures} failure(s), {warnings} warning(s))")
    else:
        lines.append(f"doctor: the signal group can work here ({warnings} warning(s))")
    return "\n".join(lines)


def exit_code(findings: Sequence[Finding]) -> int:
    """1 when any finding is a FAIL, else 0."""
    return 1 if any(f.level == FAIL for f in findings) else 0


# --- gathering the facts of this machine -------------------------------------------------------------------------


def paddle_facts() -> PaddleFacts:
    """Paddle's version, CUDA build, gloo support and visible GPU count."""
    import paddle

    from fastdeploy_patch.paddle_internals import has_gloo

    cuda = paddle.version.cuda() if paddle.is_compiled_with_cuda() else None
    gpus = paddle.device.cuda.device_count() if cuda else 0
    return PaddleFacts(version=paddle.__version__, cuda=cuda, has_gloo=has_gloo(), gpus=gpus)


def mount_type(path: str, mounts: Sequence[procfs.Mount]) -> str | None:
    """The filesystem type mounted exactly at ``path`` in the mount table ``mounts`` (the last mount wins, as the
    kernel stacks them); None when nothing is mounted there."""
    found = None
    for mount in mounts:
        if mount.target == path:
            found = mount.fs_type
    return found


def shm_facts(
    path: str, read_mounts: Callable[[], list[procfs.Mount]], statvfs: Callable[[str], os.statvfs_result]
) -> ShmFacts:
    """What ``path`` is: a directory or not, its mount type, size and free bytes."""
    if not os.path.isdir(path):
        return ShmFacts(path, is_dir=False, fs_type=None, size=0, free=0)
    stat = statvfs(path)
    return ShmFacts(
        path,
        is_dir=True,
        fs_type=mount_type(path, read_mounts()),
        size=stat.f_blocks * stat.f_frsize,
        free=stat.f_bavail * stat.f_frsize,
    )


def _read_mounts() -> list[procfs.Mount]:
    # Without a mount table the size and free space are still worth reporting; /dev/shm then reads as no mount point.
    try:
        return procfs.mounts()
    except OSError:
        return []


def shm_error(check: Callable[[], None]) -> OSError | None:
    """What ``check`` (``check_shm_usable``) raised, or None when shared memory works."""
    try:
        check()
    except OSError as exc:
        return exc
    return None


def network_facts(env: Mapping[str, str], list_interfaces: Callable[[], list[str]]) -> NetworkFacts:
    """GLOO_SOCKET_IFNAME, the interfaces, and what this host's name resolves to."""
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        address = None
    try:
        interfaces = sorted(list_interfaces())
    except OSError:
        interfaces = []
    return NetworkFacts(env.get("GLOO_SOCKET_IFNAME"), interfaces, hostname, address)


def remove_leftovers(found: Sequence[Leftover], unlink: Callable[[str], None]) -> dict[str, str | None]:
    """Remove each of ``found`` with ``unlink``: path -> None when it is gone (or already was), else why not."""
    removed: dict[str, str | None] = {}
    for leftover in found:
        why = None
        try:
            unlink(leftover.path)
        except FileNotFoundError:
            pass  # removed meanwhile, by someone else
        except OSError as exc:
            why = exc.strerror or str(exc)
        removed[leftover.path] = why
    return removed


def leftover_facts(find: Callable[[], list[Leftover]], clean: bool) -> LeftoverFacts:
    """The leftover segments ``find`` returns, removed when ``clean``."""
    found = find()
    return LeftoverFacts(found, remove_leftovers(found, os.unlink) if clean else None)


def run(*, clean: bool = False) -> list[Finding]:
    """Gather this machine's facts and return the findings; with ``clean``, remove the leftover segments first."""
    from fastdeploy_patch.signal_group import SHM_DIR, shm_reader_sleep
    from fastdeploy_patch.signal_group.shm_diagnostics import check_shm_usable, leftover_segments

    return diagnose(
        paddle_facts(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        shm_facts(SHM_DIR, _read_mounts, os.statvfs),
        shm_error(check_shm_usable),
        shm_reader_sleep(),
        network_facts(os.environ, lambda: os.listdir(SYS_CLASS_NET)),
        leftover_facts(lambda: leftover_segments(SHM_DIR), clean),
    )
