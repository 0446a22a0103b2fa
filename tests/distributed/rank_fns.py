"""What each real rank runs in the distributed tests. Every function here runs inside a rank of the
``paddle_ranks`` fixture's pool (after ``init_parallel_env()``), checks what it can see, and returns a JSON-able
report that the test in the parent process asserts on.

Every function closes the signal groups it creates: pool ranks outlive the call, and the pool fails a call that
leaves one open. Fault functions leave their world through ``exit_after_reply`` (the test asks for a fresh one).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import NoReturn

import paddle
import paddle.distributed as dist
from paddle.distributed import collective

from fastdeploy_patch import procfs
from fastdeploy_patch.group_shutdown import shutdown_process_groups
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.signal_group import (
    INT32_MAX,
    INT32_MIN,
    SEGMENT_PREFIX,
    broadcast_signal,
    liveness,
    new_signal_group,
)
from fastdeploy_patch.signal_group import group as signal_group_api
from fastdeploy_patch.status import ModelWeightsStatus
from fastdeploy_patch.testing import exit_after_reply
from fastdeploy_patch.testing.gpu_profile import count_device_events
from fastdeploy_patch.testing.rank_calls import save_coverage
from fastdeploy_patch.worker.worker_process import WorkerProcess

# Steps at which the broadcast stream carries the int32 extremes instead of a step-derived value.
_EXTREME_STEPS = {17: INT32_MIN, 18: INT32_MAX, 501: INT32_MAX, 502: INT32_MIN}
_PROBE_VALUES = (INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX)


def stream_src(step: int, nranks: int) -> int:
    """The src of broadcast ``step`` in the sequence check: rank 0, then the last rank, then the others."""
    order = [0, nranks - 1, *range(1, nranks - 1)]
    return order[step % len(order)]


def stream_value(step: int, src: int) -> int:
    """The value src sends at ``step``: unique per step (so a lost, reordered or stale one shows) and signed."""
    if step in _EXTREME_STEPS:
        return _EXTREME_STEPS[step]
    value = step * 1_000_003 + src
    return value if step % 2 else -value


def stream_digest(values: list[int]) -> str:
    """A digest of a received stream, compared across ranks and against the expected stream."""
    return hashlib.sha256(",".join(map(str, values)).encode()).hexdigest()


def _registry() -> dict[str, list]:
    """Paddle's named-group registry as ``{name: [id, ranks, backend class]}``."""
    groups = collective._get_group_map_by_name()
    return {name: [g.id, list(g.ranks), type(g.process_group).__name__] for name, g in groups.items()}


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)}


def _call_error(fn) -> dict | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the report names whatever was raised
        return _error(exc)
    return None


def _model(rank: int) -> paddle.nn.Layer:
    paddle.seed(1234 + rank)
    return paddle.nn.Sequential(paddle.nn.Linear(6, 5), paddle.nn.Linear(5, 3))


def _checksums(model: paddle.nn.Layer) -> dict[str, str]:
    return {name: hashlib.sha256(p.numpy().tobytes()).hexdigest() for name, p in model.named_parameters()}


# --- A: broadcasts, bad input, group created once, safe shutdown, the upstream bug --------------------


def signal_checks(
    *,
    transport: str,
    status_name: str,
    steps: int,
    loop_steps: int,
    cycles: int,
    profile_steps: int,
    idle_s: float,
    lookaheads: list[int],
    lookahead_steps: int,
) -> dict:
    """Every single-group check on one launch, on one transport; the upstream bug is provoked last since it leaves
    Paddle's groups half shut down."""
    rank, nranks = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "nranks": nranks}
    registry_before_group = _registry()
    group = new_signal_group(transport=transport)
    report["registry_grew_by"] = sorted(set(_registry()) - set(registry_before_group))
    report["transport"] = group.transport
    report["signal_group_name"] = _paddle_name(group)
    report["stream"] = _stream(group, rank, nranks, steps)
    report["stale"] = _stale_value(group, rank, nranks)
    report["probes"] = _probes(group, nranks)
    report["bad_input"] = _bad_input(group, rank, nranks)
    report["idle"] = _idle_wait(group, rank, idle_s)
    report["worker"] = _worker_group_once(rank, status_name, loop_steps, transport)
    report["profile"] = _profile_signal(group, profile_steps)
    report["safe_shutdown"] = _safe_shutdown(group, nranks, cycles)
    report["lookahead"] = {str(d): _lookahead_stream(rank, nranks, d, lookahead_steps) for d in lookaheads}
    report["upstream_bug"] = _upstream_shutdown(group)
    group.close()
    return report


def _paddle_name(group) -> str | None:
    return group.paddle_group.name if group.paddle_group is not None else None


def _stream(group, rank: int, nranks: int, steps: int) -> dict:
    received, mismatches = [], []
    for step in range(steps):
        src = stream_src(step, nranks)
        expected = stream_value(step, src)
        value = broadcast_signal(expected if rank == src else 0, src=src, group=group)
        received.append(value)
        if value != expected:
            mismatches.append([step, src, value, expected])
    return {"steps": steps, "mismatches": mismatches[:10], "digest": stream_digest(received)}


def _stale_value(group, rank: int, nranks: int) -> list[int]:
    """The statuses of a clear and update, each followed by NORMAL (0), from the last rank: a transport that kept
    the previous value when src sends 0 would deliver CLEARING or UPDATING twice."""
    src = nranks - 1
    sent = [ModelWeightsStatus.CLEARING, 0, ModelWeightsStatus.UPDATING, 0, 0, ModelWeightsStatus.CLEARED, 0]
    return [broadcast_signal(int(v) if rank == src else 99, src=src, group=group) for v in sent]


def _idle_wait(group, rank: int, idle_s: float) -> dict:
    """Rank 0 publishes only after ``idle_s``: every other rank reports the CPU time its waiting broadcast used."""
    if rank == 0:
        time.sleep(idle_s)
    wall, cpu = time.monotonic(), time.process_time()
    value = broadcast_signal(31337 if rank == 0 else 0, src=0, group=group)
    return {"value": value, "wall": time.monotonic() - wall, "cpu": time.process_time() - cpu}


def _lookahead_stream(rank: int, nranks: int, lookahead: int, steps: int) -> dict:
    """``steps`` calls on a shared-memory group with ``lookahead``, src changing every call: call n must return
    the value of call n - lookahead (the initial value first). Then the group is closed and refuses a call."""
    initial = -7
    group = new_signal_group(transport="shm", lookahead=lookahead, initial=initial)
    received, mismatches = [], []
    for step in range(steps):
        src = stream_src(step, nranks)
        value = broadcast_signal(stream_value(step, src) if rank == src else 0, src=src, group=group)
        earlier = step - lookahead
        expected = initial if earlier < 0 else stream_value(earlier, stream_src(earlier, nranks))
        received.append(value)
        if value != expected:
            mismatches.append([step, src, value, expected])
    group.close()
    return {
        "transport": group.transport,
        "lookahead": group.lookahead,
        "mismatches": mismatches[:10],
        "digest": stream_digest(received),
        "after_close": _call_error(lambda: broadcast_signal(0, src=0, group=group)),
    }


def _probes(group, nranks: int) -> dict[str, list[int]]:
    """Every value of ``_PROBE_VALUES`` from every src; non-src ranks pass a decoy that must not win."""
    rank = dist.get_rank()
    return {
        str(src): [broadcast_signal(v if rank == src else 12345, src=src, group=group) for v in _PROBE_VALUES]
        for src in range(nranks)
    }


def _bad_input(group, rank: int, nranks: int) -> dict:
    """Bad input raises on the calling rank alone; the next good broadcast proves nothing was sent."""
    src = nranks - 1
    report: dict = {}
    if rank == src:
        for label, bad in [
            ("over", INT32_MAX + 1),
            ("under", INT32_MIN - 1),
            ("float", 1.5),
            ("str", "3"),
            ("bool", True),
        ]:
            report[label] = _call_error(lambda bad=bad: broadcast_signal(bad, src=src, group=group))
    report["src_not_member"] = _call_error(lambda: broadcast_signal(1, src=nranks, group=group))
    report["src_not_int"] = _call_error(lambda: broadcast_signal(1, src="0", group=group))
    report["no_group"] = _call_error(lambda: broadcast_signal(1, src=0, group=None))
    report["after"] = broadcast_signal(-424242 if rank == src else 0, src=src, group=group)
    return report


def _worker_group_once(rank: int, status_name: str, loop_steps: int, transport: str) -> dict:
    """A worker creates its signal group in its constructor and never again, whatever the loop does."""
    status = StatusSignal(status_name) if rank == 0 else None
    worker = None
    try:
        registry_before = _registry()
        created_before = signal_group_api._created
        worker = WorkerProcess(_model(rank), status_signal=status, signal_transport=transport)
        registry_after_init = _registry()
        created_after_init = signal_group_api._created
        ran = worker.event_loop(loop_steps)
        return {
            "new_groups_at_init": sorted(set(registry_after_init) - set(registry_before)),
            "worker_group": _paddle_name(worker.signal_group),
            "worker_transport": worker.signal_group.transport,
            "created_at_init": created_after_init - created_before,
            "created_in_loop": signal_group_api._created - created_after_init,
            "registry_unchanged_by_loop": _registry() == registry_after_init,
            "steps": [ran, worker.steps],
            "transitions": worker.transitions,
            "status": int(worker.status),
        }
    finally:
        if worker is not None:
            worker.signal_group.close()
        if status is not None:
            status.close()


def _profile_signal(group, steps: int) -> dict:
    """Profile signal broadcasts on CPU: proves the profile parser walks a real Paddle result tree."""
    import paddle.profiler as profiler

    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _prof: None)
    prof.start()
    for step in range(steps):
        # The broadcast runs no Paddle op on a non-src rank, so give every rank one host node per step to find.
        with profiler.RecordEvent(f"signal_step_{step}"):
            broadcast_signal(step, src=0, group=group)
    prof.stop()
    counts = count_device_events(prof.profiler_result.get_data())
    return {"host_events": counts.host_events, "device_events": counts.device_events}


def _safe_shutdown(group, nranks: int, cycles: int) -> dict:
    """shutdown_process_groups() never raises, leaves the registry alone, and the signal group keeps working,
    over ``cycles`` clear->update cycles (shutdown, restart)."""
    rank = dist.get_rank()
    before = _registry()
    shut_per_cycle, received, registry_changes = [], [], 0
    for cycle in range(cycles):
        shut_per_cycle.append(shutdown_process_groups())
        registry_changes += _registry() != before
        src = cycle % nranks
        received.append(broadcast_signal(7000 + cycle if rank == src else 0, src=src, group=group))
        dist.restart_process_group()
        registry_changes += _registry() != before
    return {
        "shut_per_cycle": shut_per_cycle,
        "received": received,
        "registry_changes": registry_changes,
        "registry": before,
    }


def _upstream_shutdown(group) -> dict | None:
    return _call_error(dist.shutdown_process_group)


# --- B: the RL control cycle ----------------------------------------------------------------------------


def rl_cycle(
    *,
    status_name: str,
    progress_name: str,
    step_interval: float,
    max_steps: int,
    tail: int,
    transport: str,
    lookahead: int,
) -> dict:
    """Run the worker's event loop while the test's driver flips the engine status, until every rank has seen
    the cycle back to NORMAL and ``tail`` more steps. Rank 0 publishes its step count for the driver."""
    rank = dist.get_rank()
    status = StatusSignal(status_name) if rank == 0 else None
    progress = StatusSignal(progress_name) if rank == 0 else None
    try:
        model = _model(rank)
        before = _checksums(model)
        worker = WorkerProcess(
            model,
            status_signal=status,
            forward_input=paddle.ones([2, 6]),
            signal_transport=transport,
            signal_lookahead=lookahead,
        )
        released_when_cleared, done_at = None, None
        while done_at is None or worker.steps < done_at + tail:
            if worker.steps >= max_steps:
                raise RuntimeError(f"the driver did not finish the cycle in {max_steps} steps: {worker.transitions}")
            step_status = worker.event_loop_step()
            if step_status == ModelWeightsStatus.CLEARING:
                released_when_cleared = [p._is_initialized() for p in model.parameters()]
            seen = [s for _, s in worker.transitions]
            if done_at is None and ModelWeightsStatus.UPDATING in seen and seen[-1] == ModelWeightsStatus.NORMAL:
                done_at = worker.steps
            if progress is not None:
                progress.value[0] = worker.steps
            time.sleep(step_interval)
        manager = worker.weight_manager
        worker.signal_group.close()
        return {
            "rank": rank,
            "transport": worker.signal_group.transport,
            "lookahead": worker.signal_group.lookahead,
            "transitions": [[step, int(s)] for step, s in worker.transitions],
            "steps": worker.steps,
            "initialized_after_clear": released_when_cleared,
            "checksums_before": before,
            "checksums_after": _checksums(model),
            "released": manager.parameters_released,
            "restored": manager.parameters_restored,
            "forward_passes": worker.forward_passes,
            "manager_status": int(manager.status),
        }
    finally:
        for shm in (status, progress):
            if shm is not None:
                shm.close()


# --- C: several signal groups in one process -------------------------------------------------------------


def several_groups(*, rounds: int, transport: str) -> dict:
    """Create several signal groups per round (the world twice, and subsets whose first member is not rank 0),
    then broadcast a value unique to each group from its last and first member."""
    rank, nranks = dist.get_rank(), dist.get_world_size()
    layouts = [None, None, list(range(1, nranks)), [nranks - 1, 0], list(range(nranks - 2, nranks))]
    per_round = []
    registry_start = len(_registry())
    for round_ in range(rounds):
        groups = [(layout or list(range(nranks)), new_signal_group(layout, transport=transport)) for layout in layouts]
        received = []
        for index, (members, group) in enumerate(groups):
            if rank not in members:
                received.append(
                    _call_error(lambda group=group, members=members: broadcast_signal(1, src=members[0], group=group))
                )
                continue
            values = []
            for src in (max(members), min(members)):
                value = 100_000 * round_ + 100 * index + src
                values.append(broadcast_signal(value if rank == src else -1, src=src, group=group))
            received.append(values)
        per_round.append(
            {"members": [m for m, _ in groups], "received": received, "transports": [g.transport for _, g in groups]}
        )
        for _, group in groups:
            group.close()
    return {
        "rank": rank,
        "rounds": per_round,
        "registry_grew_by": len(_registry()) - registry_start,
    }


# --- D and E: faults -----------------------------------------------------------------------------------


def dead_peer(*, victim: int, die_at: int, steps: int, timeout: float, transport: str, lookahead: int) -> NoReturn:
    """The victim exits abruptly at step ``die_at``; every survivor reports the error it got."""
    rank = dist.get_rank()
    group = new_signal_group(timeout=timeout, transport=transport, lookahead=lookahead)
    for step in range(steps):
        if rank == victim and step == die_at:
            exit_after_reply({"rank": rank, "died_at": step})
        started = time.monotonic()
        try:
            broadcast_signal(step, src=0, group=group)
        except Exception as exc:  # noqa: BLE001 - the report names whatever was raised
            failed = {"rank": rank, "step": step, "elapsed": time.monotonic() - started, **_error(exc)}
            failed["again"] = _call_error(lambda step=step: broadcast_signal(step, src=0, group=group))
            # Leave without Python teardown: Paddle may still hold a half-closed pair to the dead peer.
            exit_after_reply(failed)
    raise AssertionError(f"rank {rank} ran {steps} broadcasts without noticing that rank {victim} died")


def stuck_peer(
    *, stuck: int, stuck_at: int, timeout: float, stuck_for: float, transport: str, lookahead: int
) -> NoReturn:
    """The stuck rank, the signal's src, stays alive but stops broadcasting at ``stuck_at``; every other rank
    goes on calling and reports how many calls still returned (the lookahead's worth) and how long the call that
    waited took to give up.

    The stuck rank is the src because a src's send completes into the socket buffer (or the ring) whether or not
    a receiver takes part: it is the receivers that wait on a stuck peer. It stays stuck until every other rank
    has reported and left, or for ``stuck_for`` seconds at most, and says which of the two ended its wait."""
    rank = dist.get_rank()
    peers: list[liveness.ProcessIdentity] = []
    dist.all_gather_object(peers, liveness.this_process())
    group = new_signal_group(timeout=timeout, transport=transport, lookahead=lookahead)
    for step in range(stuck_at):
        broadcast_signal(step, src=stuck, group=group)
    if rank == stuck:
        started = time.monotonic()
        others = [peer for other, peer in enumerate(peers) if other != rank]
        while not (peers_left := all(map(liveness.gone_reason, others))) and time.monotonic() - started < stuck_for:
            time.sleep(0.05)
        exit_after_reply({"rank": rank, "slept": time.monotonic() - started, "peers_left": peers_left})
    returned, error = [], None
    while error is None and len(returned) <= lookahead:
        started = time.monotonic()
        try:
            returned.append(broadcast_signal(0, src=stuck, group=group))
        except Exception as exc:  # noqa: BLE001 - the report names whatever was raised
            error = _error(exc)
        elapsed = time.monotonic() - started
    again_started = time.monotonic()
    # The call that timed out can be made again, with its own src only: another src is refused at once.
    other_src = (stuck + 1) % dist.get_world_size()
    again = _call_error(lambda: broadcast_signal(stuck_at, src=other_src, group=group))
    # The abandoned broadcast still sits in gloo on a daemon thread; do not let teardown wait for it.
    exit_after_reply(
        {
            "rank": rank,
            "returned_after_stuck": returned,
            "elapsed": elapsed,
            "error": error,
            "again": again,
            "again_elapsed": time.monotonic() - again_started,
        }
    )


# --- F: every rank SIGKILLed mid-run ------------------------------------------------------------------


def killed_mid_run(*, steps: int) -> NoReturn:
    """Broadcast ``steps`` times on a shared-memory group, show the segment's mapping (unlinked already), then
    SIGKILL this rank: nothing may be left in /dev/shm."""
    rank = dist.get_rank()
    group = new_signal_group(transport="shm")
    for step in range(steps):
        broadcast_signal(step, src=step % dist.get_world_size(), group=group)
    maps = [path for path in procfs.mapped_paths("self") if SEGMENT_PREFIX in path]
    print(f"rank {rank} maps: {maps}", flush=True)
    # Coverage saved first (SIGKILL leaves no chance to), with SIGTERM ignored meanwhile: the first rank to die
    # makes the pool kill the others, and coverage's SIGTERM handler would start a second save inside this one.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    save_coverage()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not kill the rank")


# --- GPU runners only --------------------------------------------------------------------------------------------


def gpu_checks(*, steps: int) -> dict:
    """On an NCCL default group plus the gloo signal group: count the device work of signal broadcasts and of
    the legacy GPU-tensor broadcast, and check the safe shutdown stops and restart revives an NCCL group."""
    import paddle.profiler as profiler

    rank, nranks = dist.get_rank(), dist.get_world_size()
    signal = new_signal_group()
    # A non-default NCCL group: the default one is never shut down, by Paddle or by us.
    nccl = dist.new_group(list(range(nranks)))

    def profiled(fn) -> dict:
        prof = profiler.Profiler(
            targets=[profiler.ProfilerTarget.CPU, profiler.ProfilerTarget.GPU], on_trace_ready=lambda _prof: None
        )
        prof.start()
        fn()
        paddle.device.synchronize()
        prof.stop()
        counts = count_device_events(prof.profiler_result.get_data())
        return {"host": counts.host_events, "kernels": counts.kernels, "memcpys": counts.memcpys}

    def signal_steps() -> None:
        for step in range(steps):
            broadcast_signal(step, src=0, group=signal)

    def legacy_steps() -> None:
        for step in range(steps):
            tensor = paddle.full([1], step, dtype="int32")
            dist.broadcast(tensor, src=0)
            tensor.numpy()

    def nccl_sum() -> int:
        tensor = paddle.full([1], rank + 1, dtype="int32")
        dist.all_reduce(tensor, group=nccl)
        return int(tensor.numpy()[0])

    legacy_steps()  # warm-up: NCCL communicators are created lazily
    signal_steps()
    report = {"rank": rank, "signal": profiled(signal_steps), "legacy": profiled(legacy_steps)}
    report["sum_before"] = nccl_sum()
    report["shut"] = shutdown_process_groups()
    report["down_after_shutdown"] = sorted(collective._get_shutdown_group_map_by_name())
    dist.restart_process_group()
    report["down_after_restart"] = sorted(collective._get_shutdown_group_map_by_name())
    report["sum_after"] = nccl_sum()
    report["nccl_group"] = nccl.name
    report["signal_after"] = broadcast_signal(77, src=0, group=signal)
    signal.close()
    return report


# --- the harness's own failure reports ---------------------------------------------------------------------------


def fail_on(*, rank: int, message: str) -> dict:
    """``rank`` raises ``ValueError(message)``; every other rank waits to be killed."""
    if dist.get_rank() == rank:
        raise ValueError(message)
    time.sleep(600)
    return {}


def hang_on(*, rank: int, entered: str | None = None) -> dict:
    """``rank`` hangs in a function whose name its stack shows, after creating the file ``entered`` (when given) to
    say it is there; every other rank returns at once."""
    if dist.get_rank() == rank:
        if entered is not None:
            Path(entered).touch()
        _hanging_here()
    return {"rank": dist.get_rank()}


def _hanging_here() -> None:
    time.sleep(600)


def crash_on(*, rank: int, how: str) -> dict:
    """``rank`` crashes in ``_crashing_here``: ``how`` is ``"segv"`` (a read of address 0) or ``"abort"``
    (``abort()``, as a failed C++ check would); every other rank waits to be killed."""
    if dist.get_rank() == rank:
        _crashing_here(how)
    time.sleep(600)
    return {}


def _crashing_here(how: str) -> None:
    import ctypes

    if how == "segv":
        ctypes.string_at(0)
    os.abort()
