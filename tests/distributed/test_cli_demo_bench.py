"""The `demo`, `bench`, `smoke` and `doctor` commands end to end: the real CLI in a subprocess, starting real CPU
ranks.

Each CLI process carries the suite's run tag, so the autouse check in conftest proves that no rank it started
outlived the test.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paddle
import pytest

from fastdeploy_patch import procfs
from tests.distributed.harness import REPO_ROOT, rank_env

CLI_TIMEOUT_S = 300.0
"""How long one CLI run may take before the test interrupts it, a hang guard only; below each test's pytest-timeout
(``CLI_TEST_TIMEOUT_S``). The slowest run seen, the latency bench beside loops of distributed tests and three other
checkouts' suites (load 15-18 on 2 cores), took 57 s, the CLI's and its ranks' starts included."""
CLI_TEST_TIMEOUT_S = 360


def _start(*args: str, console_script: bool = False) -> subprocess.Popen:
    command = (
        [str(Path(sys.executable).with_name("fastdeploy-patch"))]
        if console_script
        else [
            sys.executable,
            "-m",
            "fastdeploy_patch",
        ]
    )
    return subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **rank_env(), "PYTHONUNBUFFERED": "1"},
    )


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """Interrupt the CLI as Ctrl-C would (it then kills its ranks), and kill it if even that does not end it."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def run_cli(*args: str, console_script: bool = False, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the CLI to the end and return its exit code and output; a run that overstays fails the test."""
    proc = _start(*args, console_script=console_script)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        pytest.fail(f"fastdeploy-patch {' '.join(args)} ran over {timeout:g} s\nstdout:\n{out}\nstderr:\n{err}")
    assert _our_segments(proc.pid) == [], "the CLI left its shared memory behind"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rows(out: str) -> dict[int, list[str]]:
    """The demo table's rows by rank, as stripped cells."""
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 8 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def _steps(transitions: str) -> list[int]:
    match = re.fullmatch(r"CLEARING@(\d+) CLEARED@(\d+) UPDATING@(\d+) NORMAL@(\d+)", transitions)
    assert match, transitions
    return [int(step) for step in match.groups()]


def _our_segments(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"fdp-demo-{pid}-"))


@pytest.mark.timeout(CLI_TEST_TIMEOUT_S)
@pytest.mark.parametrize(("transport", "lookahead", "steps"), [("shm", 0, 30), ("shm", 4, 40), ("gloo", 0, 30)])
def test_demo_runs_a_clear_update_cycle_that_every_rank_sees_at_the_same_steps(
    transport: str, lookahead: int, steps: int
) -> None:
    args = ("demo", "--nranks", "2", "--steps", str(steps), "--transport", transport, "--lookahead", str(lookahead))
    done = run_cli(*args)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    # Progress: each phase of the engine's side, as it happens.
    for phase in ("requested CLEARING", "rank 0 reports CLEARED", "requested UPDATING", "rank 0 reports NORMAL"):
        assert re.search(rf"^\[engine\] step \d+/{steps}: {phase}", out, re.MULTILINE), out
    rows = _rows(out)
    assert sorted(rows) == [0, 1], out
    clearing, cleared, updating, normal = _steps(rows[0][3])
    # Rank 0 answers each request in the step that carried it out; its answer is read at the next step and takes
    # effect the lookahead later.
    assert (cleared, normal) == (clearing + 1 + lookahead, updating + 1 + lookahead)
    assert 1 < clearing and cleared < updating and normal <= steps
    # Every rank acts on each status exactly the lookahead after rank 0 read it from the engine.
    [read] = re.findall(r"^rank 0 read from the engine: (.*) \(lookahead (\d+): ", out, re.MULTILINE)
    assert int(read[1]) == lookahead
    assert [step + lookahead for step in _steps(read[0])] == [clearing, cleared, updating, normal]
    for rank in (0, 1):
        transport_used, ran, transitions, params, groups, p50, p99 = rows[rank][1:]
        assert (transport_used, ran, transitions, params) == (transport, str(steps), rows[0][3], "2/2")
        # On CPU every group is gloo, which cannot be shut down: nothing to shut down or restart.
        assert groups == "0/0"
        assert 0 < float(p50) <= float(p99)
    assert "ranks agree: yes" in out
    assert out.rstrip().endswith("demo: OK (2 ranks saw the whole clear/update cycle at the same steps)")


@pytest.mark.timeout(CLI_TEST_TIMEOUT_S)
def test_bench_json_reports_each_path_over_every_rank_and_the_ratios() -> None:
    done = run_cli("bench", "--nranks", "2", "--iters", "100", "--warmup", "10", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout is exactly one JSON object
    assert {k: report[k] for k in ("mode", "nranks", "iters", "warmup", "backend", "paddle_version")} == {
        "mode": "latency",
        "nranks": 2,
        "iters": 100,
        "warmup": 10,
        "backend": "gloo",
        "paddle_version": paddle.__version__,
    }
    paths = report["paths"]
    assert list(paths) == ["legacy", "gloo", "gloo_deadline", "shm"]
    for path in paths.values():
        assert path["samples"] == 200 and sorted(path["per_rank"]) == ["0", "1"]
        assert 0 < path["p50_us"] <= path["p99_us"] and path["mean_us"] > 0
    for name, (top, bottom) in {
        "legacy_over_gloo": ("legacy", "gloo"),
        "gloo_over_shm": ("gloo", "shm"),
        "legacy_over_shm": ("legacy", "shm"),
    }.items():
        assert report["ratios"][name]["p50"] == pytest.approx(paths[top]["p50_us"] / paths[bottom]["p50_us"])
        assert report["ratios"][name]["mean"] == pytest.approx(paths[top]["mean_us"] / paths[bottom]["mean_us"])
    deadline = paths["gloo_deadline"]["p50_us"] - paths["gloo"]["p50_us"]
    assert report["deadline_thread_cost_us"]["p50"] == pytest.approx(deadline)
    assert "bench: 2 ranks (gloo), 10 warm-up + 100 timed steps per path..." in done.stderr


@pytest.mark.timeout(CLI_TEST_TIMEOUT_S)
def test_bench_jitter_json_reports_loop_time_and_overhead_per_path() -> None:
    done = run_cli("bench", "--jitter", "--nranks", "2", "--iters", "100", "--warmup", "10", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {k: report[k] for k in ("mode", "nranks", "iters", "warmup", "work_us", "lookahead")} == {
        "mode": "jitter",
        "nranks": 2,
        "iters": 100,
        "warmup": 10,
        "work_us": [200, 400],
        "lookahead": 4,
    }
    paths = report["paths"]
    assert list(paths) == ["nosync", "gloo", "shm", "shm_lookahead"]
    base = paths["nosync"]["mean_us"]
    # Every step does at least 200 us of work.
    assert base >= 200 and 200 <= report["work_us_mean"] <= 400
    for path in paths.values():
        assert path["samples"] == 200 and path["mean_us"] >= 200
        assert path["overhead_pct"] == pytest.approx((path["mean_us"] - base) / base * 100)
    assert "loop steps with per-rank CPU work per path..." in done.stderr


@pytest.mark.timeout(CLI_TEST_TIMEOUT_S)
def test_smoke_on_three_real_ranks_sees_every_src_and_a_broadcast_after_the_restart() -> None:
    # The CLI's own timeout ends its ranks first; run_cli's (longer) interrupts the CLI itself, which ends them too.
    done = run_cli("smoke", "--nranks", "3", "--timeout", "240")
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[0] == "smoke: starting 3 CPU rank(s)..."
    # Every rank received each src's value; on CPU every group is gloo, so the safe shutdown had nothing to shut
    # down, and the signal group still carried a value after Paddle's restart.
    for rank in range(3):
        assert f"rank {rank}: received {{'0': 1000, '1': 1001, '2': 1002}}, shut down [], after restart -7" in lines, (
            done.stdout
        )
    assert lines[-1] == "smoke: OK (3 ranks agree)"
    assert "FAILED" not in done.stderr


@pytest.mark.timeout(CLI_TEST_TIMEOUT_S)
def test_doctor_reports_this_machine_and_passes_here() -> None:
    done = run_cli("doctor", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"[ OK ] Paddle: {paddle.__version__}, CPU build, gloo: yes")
    assert '[ OK ] ranks on this host: transport="auto" picks shm (shared memory works here)' in lines
    assert any(line.startswith("[ OK ] /dev/shm: mounted (tmpfs)") for line in lines)
    assert lines[-1].startswith("doctor: the signal group can work here")
    assert "ccache" not in done.stderr


def _children(pid: int) -> list[int]:
    """The children of process ``pid``, whichever of its threads started them: read from that process alone, never
    from the whole process table, where other tests start and end processes meanwhile."""
    return procfs.children(pid) or []


def _is_rank(pid: int) -> bool:
    return any("fastdeploy_patch.testing.rank_entry" in arg for arg in procfs.cmdline(pid) or [])


@pytest.mark.timeout(CLI_TEST_TIMEOUT_S)
def test_ctrl_c_stops_every_rank_removes_the_shared_memory_and_exits_130() -> None:
    proc = _start("demo", "--nranks", "2", "--steps", "100000")
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not any("the ranks are running" in line for line in seen):
            assert time.monotonic() < deadline, f"no progress from the demo: {seen}"
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, f"the demo exited early ({proc.returncode}): {seen}"
        ranks = [pid for pid in _children(proc.pid) if _is_rank(pid)]
        assert len(ranks) == 2
        assert len(_our_segments(proc.pid)) == 2
        proc.send_signal(signal.SIGINT)
        # A bound against a hang, not a speed test: the ranks get 3 s to exit on SIGTERM, then SIGKILL.
        returncode = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            _stop(proc)
    err = proc.stderr.read()
    assert returncode == 130, err
    assert "demo: interrupted; every rank stopped and the shared memory was removed" in err
    assert not any(_is_rank(pid) for pid in ranks)
    assert _our_segments(proc.pid) == []


@pytest.mark.parametrize(
    ("args", "console_script", "error"),
    [
        (("bench", "--iters", "0"), False, "fastdeploy-patch bench: error: argument --iters: expected a positive"),
        (("bench", "--iters", "0"), True, "fastdeploy-patch bench: error: argument --iters: expected a positive"),
        (("demo", "--nranks", "0"), True, "fastdeploy-patch demo: error: argument --nranks: expected a positive"),
        (("frobnicate",), False, "fastdeploy-patch: error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_from_the_command_and_the_module(args, console_script: bool, error: str) -> None:
    if console_script and not Path(sys.executable).with_name("fastdeploy-patch").exists():
        pytest.skip("the fastdeploy-patch console script is not installed beside this Python")
    done = run_cli(*args, console_script=console_script, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    # Paddle may print an import warning first; the usage and the one error line end the output.
    lines = done.stderr.rstrip("\n").splitlines()
    assert any(line.startswith("usage: fastdeploy-patch") for line in lines)
    assert lines[-1].startswith(error)
