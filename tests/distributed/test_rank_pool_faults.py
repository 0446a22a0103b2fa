"""The paddle_ranks plugin on real ranks, when a call goes wrong: a rank that raises, exits mid-call, hangs, skips or
leaves a signal group open fails its test with a report that names the rank, and the next test passes on a fresh
pool with nothing of the old one left.

The tests that must fail run in an inner pytest session (pytester, in a subprocess: its own rootdir in a temporary
directory, the plugin loaded from the installed package's entry point); this file asserts on that session's report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastdeploy_patch import procfs

pytest_plugins = ["pytester"]

INNER_TIMEOUT_S = 400
EXIT_REPORTED_WITHIN_S = 30.0
"""Below the 60 s that rank 0 sleeps in the exiting call: a hang guard (may include a pool start on a busy host), and
still proof that the exit's sentinel, not rank 0's return, ended the wait."""
HANG_REPORTED_WITHIN_S = 30.0
"""After the call's timeout: the traceback wait and the kill, a few seconds on a busy host. A hang guard."""
HANG_TIMEOUT_S = 5

# Every rank function looks at its own rank; paddle is imported inside them, so the inner test process never does.
INNER_TESTS = '''
import json
import os
import time
from pathlib import Path

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import keep_open

pytestmark = pytest.mark.paddle_ranks_reuse("each fault kills a warm pool, and the next test gets another")


def rank():
    import paddle.distributed as dist

    return dist.get_rank()


def ping():
    return {"rank": rank(), "pid": os.getpid()}


def raise_on_rank_one():
    if rank() == 1:
        raise ValueError("rank 1 refuses")
    return rank()


def exit_mid_call():
    if rank() == 1:
        os._exit(3)
    time.sleep(60)


def hang():
    time.sleep(600)


def skip_in_rank():
    pytest.skip("no GPU in this rank")


def open_group():
    from fastdeploy_patch.signal_group import new_signal_group

    global LEFT_OPEN
    LEFT_OPEN = new_signal_group(transport="shm")
    return rank()


def keep_group():
    from fastdeploy_patch.signal_group import new_signal_group

    global KEPT
    KEPT = new_signal_group(transport="shm")
    return keep_open(rank(), KEPT)


def close_kept_group():
    from fastdeploy_patch.signal_group import broadcast_signal

    value = broadcast_signal(41 + rank(), src=1, group=KEPT)
    KEPT.close()
    return value


def sessions_alive(pids):
    """Processes alive in the sessions the ranks ``pids`` led (each rank has a session of its own)."""
    stats = {pid: procfs.stat(pid) for pid in procfs.pids()}
    return [pid for pid, now in stats.items() if now and now.session in pids and now.state != "Z"]


def fail_timed(paddle_ranks, name, fn, **options):
    pids = [r["pid"] for r in paddle_ranks.run(ping, 2)]
    start = time.monotonic()
    try:
        paddle_ranks.run(fn, 2, **options)
    finally:
        Path(f"{name}.json").write_text(
            json.dumps({"elapsed": time.monotonic() - start, "pids": pids, "left": sessions_alive(pids)})
        )


def clean(paddle_ranks, name):
    before = json.loads(Path(f"{name}.json").read_text())
    results = paddle_ranks.run(ping, 2)
    assert [r["rank"] for r in results] == [0, 1]
    # The same world size and environment as the failed call, yet new ranks: the failed pool is gone.
    assert not {r["pid"] for r in results} & set(before["pids"])


def test_a_raises(paddle_ranks):
    fail_timed(paddle_ranks, "raises", raise_on_rank_one)


def test_b_clean_after_raise(paddle_ranks):
    clean(paddle_ranks, "raises")


def test_c_exits(paddle_ranks):
    fail_timed(paddle_ranks, "exits", exit_mid_call)


def test_d_clean_after_exit(paddle_ranks):
    clean(paddle_ranks, "exits")


def test_e_hangs(paddle_ranks):
    fail_timed(paddle_ranks, "hangs", hang, timeout=5)


def test_f_clean_after_hang(paddle_ranks):
    clean(paddle_ranks, "hangs")


def test_g_skips(paddle_ranks):
    fail_timed(paddle_ranks, "skips", skip_in_rank)


def test_h_clean_after_skip(paddle_ranks):
    clean(paddle_ranks, "skips")


def test_i_leaves_a_group_open(paddle_ranks):
    fail_timed(paddle_ranks, "leftovers", open_group)


def test_j_clean_after_leftovers(paddle_ranks):
    clean(paddle_ranks, "leftovers")


def test_k_keeps_a_group_on_purpose_for_the_next_call(paddle_ranks):
    assert paddle_ranks.run(keep_group, 2) == [0, 1]
    assert paddle_ranks.run(close_kept_group, 2) == [42, 42]
'''


@pytest.mark.timeout(INNER_TIMEOUT_S + 30)
def test_every_fault_fails_its_own_test_only_and_is_reported_by_rank(pytester: pytest.Pytester) -> None:
    """One inner session holds every fault (each pool start costs seconds); each check below reads its report."""
    pytester.makepyfile(test_faulty=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=INNER_TIMEOUT_S)
    for check in (
        _outcomes,
        _summary,
        _raises,
        _exits,
        _hangs,
        _skips,
        _leftovers,
    ):
        check(result, pytester.path)


def _timed(path: Path, name: str) -> dict:
    return json.loads((path / f"{name}.json").read_text())


def _report(result: pytest.RunResult, test: str) -> str:
    """The inner session's failure section of ``test``."""
    text = result.stdout.str()
    start = text.index(f"_ {test} _")
    end = text.find("\n___", start + 1)
    return text[start : end if end != -1 else len(text)]


def _outcomes(result: pytest.RunResult, path: Path) -> None:
    result.assert_outcomes(passed=6, failed=5)
    failed = sorted(re.findall(r"^FAILED test_faulty.py::(\w+)", result.stdout.str(), re.M))
    assert failed == ["test_a_raises", "test_c_exits", "test_e_hangs", "test_g_skips", "test_i_leaves_a_group_open"]


def _summary(result: pytest.RunResult, path: Path) -> None:
    # Every fault kills the pool, so the clean test after it starts one (6 starts); each faulty test warms the pool
    # with one call first (5 x 2 + 5 clean + 2 calls that keep a group).
    result.stdout.fnmatch_lines(
        [
            "paddle_ranks: 6 pool starts, 17 calls served, 5 recycles "
            "(leftovers: 1, rank died: 1, rank hung: 1, rank raised: 1, rank skipped: 1)"
        ]
    )


def _raises(result: pytest.RunResult, path: Path) -> None:
    report = _report(result, "test_a_raises")
    assert "rank 1 of 2 failed in test_faulty:raise_on_rank_one: rank raised\n----- rank 1 -----\nTraceback" in report
    assert 'in raise_on_rank_one\n    raise ValueError("rank 1 refuses")\nValueError: rank 1 refuses' in report
    assert "----- rank 0 (log tail) -----" in report
    assert _timed(path, "raises")["left"] == []


def _exits(result: pytest.RunResult, path: Path) -> None:
    report = _report(result, "test_c_exits")
    assert "rank 1 of 2 failed in test_faulty:exit_mid_call: it exited before replying, exit code 3\n" in report
    assert "----- rank 0 (log tail) -----" in report
    timed = _timed(path, "exits")
    # Rank 0 sleeps 60 s in that call: only the exit's sentinel can end the wait sooner.
    assert timed["elapsed"] < EXIT_REPORTED_WITHIN_S, timed
    assert timed["left"] == []


def _hangs(result: pytest.RunResult, path: Path) -> None:
    report = _report(result, "test_e_hangs")
    assert f"ranks [0, 1] of 2 hung in test_faulty:hang for {HANG_TIMEOUT_S} s; their stacks:" in report
    for rank in (0, 1):
        # The rank's log tail ends with faulthandler's dump, which SIGUSR1 asked for.
        stack = report.split(f"----- rank {rank} -----\n", 1)[1].split("----- rank", 1)[0]
        assert re.search(
            r"(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n"
            r'  File ".*test_faulty.py", line \d+ in hang\n',
            stack,
        ), stack
    timed = _timed(path, "hangs")
    assert HANG_TIMEOUT_S <= timed["elapsed"] < HANG_TIMEOUT_S + HANG_REPORTED_WITHIN_S, timed
    assert timed["left"] == []
    for pid in timed["pids"]:
        assert procfs.stat(pid) is None, pid


def _skips(result: pytest.RunResult, path: Path) -> None:
    report = _report(result, "test_g_skips")
    assert "rank 0 of 2 failed in test_faulty:skip_in_rank: rank skipped" in report or (
        "rank 1 of 2 failed in test_faulty:skip_in_rank: rank skipped" in report
    )
    assert "Skipped: no GPU in this rank" in report
    assert "skip in the test process, before paddle_ranks.run()" in report


def _leftovers(result: pytest.RunResult, path: Path) -> None:
    report = _report(result, "test_i_leaves_a_group_open")
    assert re.search(r"rank [01] of 2 failed in test_faulty:open_group: leftovers", report), report
    assert "test_faulty:open_group left 1 signal group(s) open:\n  SignalGroup(transport='shm', ranks=[0, 1]" in report
    assert "return keep_open(result, *groups)" in report
