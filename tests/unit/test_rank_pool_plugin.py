"""The paddle_ranks plugin's handle and hooks, and a pool rank's call handling run in-process: fake ranks (no Paddle
world), a fake connection, and real SignalGroup objects with no transport behind them."""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

import pytest_paddle_ranks as entry
from fastdeploy_patch.signal_group import SignalGroup
from fastdeploy_patch.testing import pickles, plugin, pool_rank, rank_calls, rank_state
from fastdeploy_patch.testing.rank_pool import RankPools
from tests.unit.test_rank_pool import FAKE_BOOTSTRAP, die_on_one, rank_id, sleep_long

OUTSIDE_MODULE = "fdp_pool_outside_module"


def a_group() -> SignalGroup:
    return SignalGroup(transport="shm", ranks=[0, 1], rank=0, timeout=1.0, lookahead=0, endpoint=None)


@pytest.fixture(autouse=True)
def _only_this_tests_objects() -> Iterator[None]:
    # A rank freezes what it holds when it joins, so that its leftover check sees only what calls made. This test
    # process freezes what earlier tests left to the collector, which depends on which tests ran before (mutmut's
    # clean run takes a subset).
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def handle():
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP)
    yield plugin.PaddleRanks(pools, {"EXTRA": "session"})
    pools.close()


def test_run_adds_the_session_env_and_failures_fail_the_test(handle: plugin.PaddleRanks) -> None:
    assert [r["extra"] for r in handle.run(rank_id, 1, reuse=True)] == ["session"]
    assert [r["extra"] for r in handle.run(rank_id, 1, env={"EXTRA": "call"}, reuse=True)] == ["call"]
    assert len(handle.live_pids()) == 2
    with pytest.raises(pytest.fail.Exception) as failed:
        handle.run(sleep_long, 1, timeout=0.5)
    assert str(failed.value).startswith("ranks [0] of 1 hung in tests.unit.test_rank_pool:sleep_long for 0.5 s")
    assert failed.value.__context__ is None
    with pytest.raises(TypeError, match="env must map variable names to strings, got"):
        handle.run(rank_id, 1, env=[("A", "b")])


def test_run_expecting_failure_returns_the_report_or_fails(handle: plugin.PaddleRanks) -> None:
    failed = handle.run_expecting_failure(die_on_one, 2)
    assert (failed.rank, failed.returncode) == (1, 5)
    with pytest.raises(
        pytest.fail.Exception, match=re.escape("every rank of 1 finished tests.unit.test_rank_pool:rank_id, but")
    ):
        handle.run_expecting_failure(rank_id, 1)
    with pytest.raises(pytest.fail.Exception, match=re.escape("hung in tests.unit.test_rank_pool:sleep_long")):
        handle.run_expecting_failure(sleep_long, 1, timeout=0.5)


def test_start_adds_the_session_env_and_a_failure_fails_the_test_when_collected(handle: plugin.PaddleRanks) -> None:
    own_env = handle.start(rank_id, 1, env={"EXTRA": "call"})
    session_env = handle.start(rank_id, 1)
    assert sorted(handle.live_pids()) == sorted(own_env._started.pids() + session_env._started.pids())
    assert own_env.kwargs == {} and own_env._started.timeout == plugin.PADDLE_RANKS_TIMEOUT_S
    assert [r["extra"] for r in own_env.result()] == ["call"]
    assert [r["extra"] for r in session_env.result()] == ["session"]
    hung = handle.start(sleep_long, 1, timeout=1.5)
    with pytest.raises(pytest.fail.Exception) as failed:
        hung.result()
    assert str(failed.value).startswith("ranks [0] of 1 hung in tests.unit.test_rank_pool:sleep_long")
    assert failed.value.__context__ is None
    cancelled = handle.start(sleep_long, 1)
    cancelled.cancel()
    assert handle.live_pids() == []
    with pytest.raises(TypeError, match="env must map variable names to strings, got"):
        handle.start(rank_id, 1, env=[("A", "b")])


def a_config(**attributes: object) -> SimpleNamespace:
    """A config as the entry point's hooks see it once its ``pytest_configure`` ran, default settings."""
    config = SimpleNamespace(stash=pytest.Stash(), **attributes)
    config.stash[entry._SESSION] = entry._Session(entry.Settings())
    return config


def test_the_fixture_makes_one_pool_set_per_session_and_the_summary_prints_one_line() -> None:
    config = a_config()
    lines: list[str] = []
    reporter = SimpleNamespace(write_line=lines.append)
    entry.pytest_terminal_summary(reporter, config)
    assert lines == []
    request = SimpleNamespace(config=config)
    handle = entry.paddle_ranks.__wrapped__(request, {"A": "b"})
    assert isinstance(handle, plugin.PaddleRanks) and handle.timeout == 90.0
    pools = config.stash[entry._SESSION].pools
    assert (
        entry.paddle_ranks.__wrapped__(request, {}).live_pids() == [] and config.stash[entry._SESSION].pools is pools
    )
    pools.starts = 1
    entry.pytest_terminal_summary(reporter, config)
    assert lines == ["paddle_ranks: 1 pool start, 0 calls served, 0 recycles"]
    entry.pytest_unconfigure(config)
    assert entry.paddle_ranks_env.__wrapped__() == {}


def test_unconfigure_after_a_configure_that_never_ran_does_nothing() -> None:
    # Another plugin's configure hook raised before ours ran: pytest still unconfigures every plugin.
    config = SimpleNamespace(stash=pytest.Stash())
    assert entry.pytest_unconfigure(config) is None
    assert entry._SESSION not in config.stash


def test_each_call_gets_a_fresh_world_unless_the_call_or_the_test_asks_for_reuse() -> None:
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP)
    marked = [False]
    handle = plugin.PaddleRanks(pools, {}, reuse=lambda: marked[0])
    try:
        first, second = handle.run(rank_id, 1), handle.run(rank_id, 1)
        assert first[0]["pid"] != second[0]["pid"] and handle.live_pids() == []
        assert pools.starts == 2 and pools.recycles == {}
        marked[0] = True  # a test marked paddle_ranks_reuse
        warm = handle.run(rank_id, 1)
        assert handle.run(rank_id, 1) == warm and handle.live_pids() == [warm[0]["pid"]]
        assert handle.run(rank_id, 1, reuse=False) != warm  # the call's own choice wins over the marker
        with pytest.raises(TypeError, match=r"^reuse must be True, False or None, got 'yes'$"):
            handle.run(rank_id, 1, reuse="yes")
    finally:
        pools.close()


def test_the_reuse_marker_of_the_running_test_sets_the_default() -> None:
    config = a_config()
    session = config.stash[entry._SESSION]
    marked = SimpleNamespace(config=config, nodeid="t::marked", get_closest_marker=lambda name: name)
    plain = SimpleNamespace(config=config, nodeid="t::plain", get_closest_marker=lambda name: None)
    for item, reuse in ((marked, True), (plain, False)):
        protocol = entry.pytest_runtest_protocol(item)
        next(protocol)
        assert (session.current_test, session.reuse) == (item.nodeid, reuse)
        with pytest.raises(StopIteration):
            protocol.send(None)


def test_under_xdist_each_worker_closes_its_pools_and_the_controller_sums_them_up(handle: plugin.PaddleRanks) -> None:
    # A worker: its pools, with a started call nobody collected, close at the end of its session, and what they did
    # goes into the workeroutput that xdist sends to the controller.
    worker = a_config(workeroutput={"exitstatus": 0})
    worker.stash[entry._SESSION].pools = handle._pools
    handle.run(rank_id, 1, reuse=True)
    forgotten = handle.start(sleep_long, 1)
    entry.pytest_sessionfinish(SimpleNamespace(config=worker))
    assert forgotten._started.ended and handle.live_pids() == []
    assert worker.workeroutput == {
        "exitstatus": 0,
        "paddle_ranks": {"starts": 2, "calls": 2, "recycles": {"never collected": 1}},
    }

    # The controller: each finished worker's statistics add up; a worker that crashed sent none.
    controller = a_config()
    entry.pytest_testnodedown(SimpleNamespace(config=controller, workeroutput=worker.workeroutput), None)
    entry.pytest_testnodedown(SimpleNamespace(config=controller, workeroutput=worker.workeroutput), None)
    entry.pytest_testnodedown(SimpleNamespace(config=controller), "crashed")
    entry.pytest_testnodedown(SimpleNamespace(config=controller, workeroutput={"exitstatus": 0}), None)
    lines: list[str] = []
    entry.pytest_terminal_summary(SimpleNamespace(write_line=lines.append), controller)
    assert lines == ["paddle_ranks: 4 pool starts, 4 calls served, 2 recycles (never collected: 2)"]


def test_without_xdist_the_session_end_leaves_the_pools_to_unconfigure(handle: plugin.PaddleRanks) -> None:
    config = a_config()
    config.stash[entry._SESSION].pools = handle._pools
    first = handle.run(rank_id, 1, reuse=True)
    entry.pytest_sessionfinish(SimpleNamespace(config=config))
    assert not hasattr(config, "workeroutput")
    assert handle._pools.recycles == {}
    assert handle.live_pids() == [first[0]["pid"]]
    entry.pytest_sessionfinish(SimpleNamespace(config=a_config(workeroutput={})))


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(pickles.loads(data))


def run_call(call: dict, conn: FakeConn) -> dict:
    """``pool_rank.run_call`` in this process, its state put back as it is now, the result unpickled."""
    reply = pool_rank.run_call(call, conn, rank_state.Baseline.take())
    if "result" in reply:
        reply["result"] = pickles.loads(reply["result"])
    return reply


def _call(qualname: str, module: str = __name__, file: str | None = __file__, **kwargs: object) -> dict:
    return {"module": module, "qualname": qualname, "file": file, "kwargs": kwargs, "sys_path": list(sys.path)}


LEFT: list[SignalGroup] = []


def leave_open() -> int:
    LEFT.append(a_group())
    return 1


def keep_it() -> int:
    LEFT.append(a_group())
    return rank_calls.keep_open(2, LEFT[-1])


def close_it() -> int:
    LEFT.pop().close()
    return 3


STOP = threading.Event()


def start_a_thread(keep: bool) -> int:
    group = a_group()
    threading.Thread(target=STOP.wait, daemon=True).start()
    if keep:
        LEFT.append(group)
        return rank_calls.keep_open(4, group)
    group.close()
    return 4


def test_a_call_that_keeps_groups_keeps_its_threads_and_any_other_call_leaves_none() -> None:
    # Set by an earlier run of this test in the same process (mutmut runs each test more than once), the event would
    # end the second call's thread at once.
    STOP.clear()
    try:
        kept = run_call(_call("start_a_thread", keep=True), FakeConn())
        assert (kept["status"], kept["result"], kept["left_behind"]) == ("ok", 4, [])
        LEFT.pop().close()
        left = run_call(_call("start_a_thread", keep=False), FakeConn())
        assert (left["status"], left["result"], left["left_behind"]) == ("ok", 4, ["1 thread"])
    finally:
        STOP.set()


def skip_it() -> None:
    pytest.skip("not here")


def test_a_call_that_leaves_a_group_open_fails_unless_it_keeps_it() -> None:
    conn = FakeConn()
    reply = run_call(_call("leave_open"), conn)
    assert reply["status"] == "leftovers"
    assert reply["error"].startswith(f"{__name__}:leave_open left 1 signal group(s) open:\n  {LEFT[-1]!r}\n")
    LEFT.pop().close()
    assert run_call(_call("keep_it"), conn) == {"status": "ok", "result": 2, "exit_code": None, "left_behind": []}
    assert LEFT[-1] in rank_calls.kept_groups() and not LEFT[-1].closed
    assert run_call(_call("close_it"), conn)["result"] == 3
    assert pool_rank.open_groups() == []


def test_a_skip_and_a_missing_function_are_replies_not_crashes() -> None:
    skipped = run_call(_call("skip_it"), FakeConn())
    assert skipped["status"] == "skipped" and skipped["error"].endswith(pool_rank.SKIP_IN_RANK)
    missing = run_call(_call("no_such_function"), FakeConn())
    assert missing["status"] == "raised" and "AttributeError" in missing["error"]
    unknown = run_call(_call("f", module="fdp_no_such_module", file=None), FakeConn())
    assert "ModuleNotFoundError: No module named 'fdp_no_such_module'" in unknown["error"]


def test_a_module_not_importable_by_name_is_loaded_from_the_controllers_file(tmp_path) -> None:
    source = tmp_path / "elsewhere.py"
    source.write_text("def answer():\n    return 42\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('broken at import')\n")
    try:
        assert pool_rank.resolve(OUTSIDE_MODULE, "answer", str(source), list(sys.path))() == 42
        with pytest.raises(RuntimeError, match="broken at import"):
            pool_rank.resolve("fdp_pool_broken", "x", str(broken), list(sys.path))
        assert "fdp_pool_broken" not in sys.modules
        with pytest.raises(ModuleNotFoundError, match="cannot load fdp_pool_dir"):
            pool_rank.resolve("fdp_pool_dir", "x", str(tmp_path), list(sys.path))
    finally:
        sys.modules.pop(OUTSIDE_MODULE, None)


def test_the_rank_puts_the_controllers_sys_path_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", ["/b", "/a"])
    pool_rank.resolve("os", "getpid", None, ["/a", "/c"])
    assert sys.path == ["/a", "/c", "/b"]


def test_closed_says_whether_close_was_called() -> None:
    group = a_group()
    assert not group.closed
    group.close()
    assert group.closed


def test_exit_after_reply_saves_delivers_and_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[object] = []
    monkeypatch.setattr(rank_calls, "save_coverage", lambda: events.append("saved"))
    monkeypatch.setattr(rank_calls.os, "_exit", lambda code: events.append(("exit", code)))
    rank_calls.set_reply_delivery(lambda result, code: events.append(("reply", result, code)))
    try:
        rank_calls.exit_after_reply({"r": 1}, 3)
    finally:
        rank_calls.set_reply_delivery(None)
    assert events == ["saved", ("reply", {"r": 1}, 3), ("exit", 3)]


def test_joining_imports_paddle_joins_through_rank_entry_then_takes_the_handlers_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[object] = []
    monkeypatch.setattr(pool_rank.rank_imports, "import_paddle", lambda: events.append("imported"))
    monkeypatch.setattr(pool_rank.rank_entry, "join_world", lambda: events.append("joined"))
    monkeypatch.setattr(pool_rank.rank_entry, "reclaim_signal_handlers", lambda: events.append("reclaimed"))
    pool_rank.join_world()
    assert events == ["imported", "joined", "reclaimed"]


def test_main_reports_a_failed_join_and_serves_after_a_good_one(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    read, write = os.pipe()
    monkeypatch.setattr(pool_rank, "join_world", lambda: (_ for _ in ()).throw(RuntimeError("no world")))
    assert pool_rank.main([str(write)]) == 1
    assert "RuntimeError: no world" in capsys.readouterr().err
    monkeypatch.setattr(pool_rank, "join_world", lambda: (_ for _ in ()).throw(pool_rank.rank_entry.PortTaken("p")))
    _, other_write = os.pipe()
    assert pool_rank.main([str(other_write)]) == pool_rank.rank_entry.PORT_TAKEN_EXIT == 75
    assert capsys.readouterr().err == "p\n"
    served: list[object] = []
    monkeypatch.setattr(pool_rank, "join_world", lambda: None)
    monkeypatch.setattr(pool_rank, "serve", lambda conn: served.append(conn) or 0)
    monkeypatch.setattr(pool_rank.gc, "freeze", lambda: served.append("frozen"))
    assert pool_rank.main([str(read)]) == 0
    assert served[0] == "frozen"
