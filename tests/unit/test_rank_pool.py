"""fastdeploy_patch.testing.rank_pool, plugin, pool_rank and rank_calls without Paddle ranks: argument checks, the
call protocol on fake ranks (real subprocesses that serve calls without joining a world), and the import cost."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from fastdeploy_patch import procfs
from fastdeploy_patch.testing import pool_rank, pool_world, rank_calls, rank_pool, rank_processes, warm_parent
from fastdeploy_patch.testing.call_target import check_call
from fastdeploy_patch.testing.rank_pool import CallTarget, RankCallFailed, RankCallHung, RankPools
from pytest_paddle_ranks import summary

from .zombies import wait_until_a_zombie

# A rank that serves calls on its connection without importing Paddle or joining a world.
FAKE_BOOTSTRAP = rank_processes.RANK_PRELUDE + (
    "from multiprocessing.connection import Connection; from fastdeploy_patch.testing import pool_rank; "
    "sys.exit(pool_rank.serve(Connection(int(sys.argv[1]))))"
)


def record_argument(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, parameter: str) -> list:
    """From now on every call of ``owner.<name>`` still runs, and the value its ``parameter`` got (its default when
    not passed) is appended to the list returned."""
    real = getattr(owner, name)
    signature = inspect.signature(real)
    seen: list = []

    def recording(*args: object, **kwargs: object) -> object:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen.append(bound.arguments[parameter])
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


def rank_id() -> dict:
    return {"rank": int(os.environ["PADDLE_TRAINER_ID"]), "pid": os.getpid(), "extra": os.environ.get("EXTRA")}


def raise_on_one() -> int:
    if os.environ["PADDLE_TRAINER_ID"] == "1":
        raise ValueError("one refuses")
    return 0


def die_on_one() -> int:
    if os.environ["PADDLE_TRAINER_ID"] == "1":
        os._exit(5)
    time.sleep(30)
    return 0


def sleep_long() -> None:
    time.sleep(60)


def sleep_ignoring_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def leave_after_reply() -> int:
    if os.environ["PADDLE_TRAINER_ID"] == "0":
        rank_calls.exit_after_reply("gone", 0)
    return 1


def not_picklable() -> object:
    return threading.Lock()


@pytest.fixture
def pools():
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP)
    yield pools
    pools.close()


def test_a_warm_pool_serves_calls_on_the_same_ranks(pools: RankPools) -> None:
    first = pools.run(rank_id, 2, timeout=30, env={"EXTRA": "yes"})
    again = pools.run(rank_id, 2, timeout=30, env={"EXTRA": "yes"})
    assert [r["rank"] for r in first] == [0, 1]
    assert [r["extra"] for r in first] == ["yes", "yes"]
    assert [r["pid"] for r in again] == [r["pid"] for r in first]
    assert sorted(pools.live_pids()) == sorted(r["pid"] for r in first)
    assert summary(pools.stats()) == "paddle_ranks: 1 pool start, 2 calls served, 0 recycles"


def test_stats_are_json() -> None:
    # What an xdist worker's pools did reaches the controller as JSON (pytest_paddle_ranks adds them up).
    worker = RankPools()
    worker.starts, worker.calls = 3, 7
    worker.recycles.update({"fresh world": 2, "rank died": 1})
    stats = json.loads(json.dumps(worker.stats()))
    assert stats == {"starts": 3, "calls": 7, "recycles": {"fresh world": 2, "rank died": 1}}


def test_a_raise_is_reported_by_rank_and_the_next_call_gets_new_ranks(pools: RankPools) -> None:
    before = pools.run(rank_id, 2, timeout=30)
    with pytest.raises(RankCallFailed) as failed:
        pools.run(raise_on_one, 2, timeout=30)
    assert failed.value.rank == 1 and failed.value.returncode is None and failed.value.reason == "rank raised"
    assert str(failed.value).startswith("rank 1 of 2 failed in tests.unit.test_rank_pool:raise_on_one: rank raised")
    assert "ValueError: one refuses" in failed.value.error
    after = pools.run(rank_id, 2, timeout=30)
    assert not {r["pid"] for r in after} & {r["pid"] for r in before}
    assert summary(pools.stats()) == "paddle_ranks: 2 pool starts, 3 calls served, 1 recycle (rank raised: 1)"


def test_a_death_is_seen_at_once_with_its_exit_code(pools: RankPools) -> None:
    pools.run(rank_id, 2, timeout=30)
    start = time.monotonic()
    with pytest.raises(RankCallFailed) as failed:
        pools.run(die_on_one, 2, timeout=30)
    # Below the call's timeout: the death, not the timeout, ended the wait (a bound a busy host cannot break).
    assert time.monotonic() - start < 30
    assert (failed.value.rank, failed.value.returncode, failed.value.reason) == (1, 5, "rank died")
    assert "it exited before replying, exit code 5\n" in str(failed.value)


def test_a_hang_reports_every_stack_and_kills_the_ranks(pools: RankPools) -> None:
    pids = [r["pid"] for r in pools.run(rank_id, 2, timeout=30)]
    with pytest.raises(RankCallHung) as hung:
        pools.run(sleep_long, 2, timeout=1)
    assert str(hung.value).startswith("ranks [0, 1] of 2 hung in tests.unit.test_rank_pool:sleep_long for 1 s")
    for rank in (0, 1):
        assert "in sleep_long" in hung.value.reports[rank]
    assert all(procfs.stat(pid) is None for pid in pids)
    assert pools.recycles == {"rank hung": 1}


def test_no_wait_for_replies_outlasts_what_is_left_of_the_calls_timeout(
    pools: RankPools, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools.run(rank_id, 1, timeout=30)
    waits = record_argument(monkeypatch, rank_processes, "wait", "timeout")
    with pytest.raises(
        RankCallHung, match=r"^ranks \[0\] of 1 hung in tests.unit.test_rank_pool:sleep_long for 0.3 s"
    ):
        pools.run(sleep_long, 1, timeout=0.3)
    assert waits and all(0 <= timeout <= 0.3 for timeout in waits), waits


def test_exit_after_reply_counts_the_reply_then_retires_the_pool(pools: RankPools) -> None:
    assert pools.run(leave_after_reply, 2, timeout=30) == ["gone", 1]
    assert pools.live_pids() == []
    assert pools.recycles == {"rank exited": 1}


def test_a_result_that_cannot_be_pickled_fails_the_call_naming_the_rank_and_the_type(pools: RankPools) -> None:
    with pytest.raises(RankCallFailed) as failed:
        pools.run(not_picklable, 1, timeout=30)
    assert failed.value.reason == "rank raised"
    assert (
        "TypeError: rank 0 cannot send what tests.unit.test_rank_pool:not_picklable returned to the test process: a "
        "lock that cannot be pickled (TypeError: cannot pickle '_thread.lock' object)"
    ) in failed.value.error


def test_fresh_worlds_are_thrown_away_and_a_third_key_retires_the_oldest(pools: RankPools) -> None:
    pools.run(rank_id, 1, timeout=30, fresh=True)
    assert pools.live_pids() == []
    pools.run(rank_id, 1, timeout=30)
    pools.run(rank_id, 2, timeout=30)
    live = sorted(pools.live_pids())
    # A fresh world beside two live pools retires neither.
    fresh = [r["pid"] for r in pools.run(rank_id, 2, timeout=30, fresh=True)]
    assert sorted(pools.live_pids()) == live and not set(fresh) & set(live)
    assert pools.starts == 4 and pools.recycles == {}  # a fresh world's end is no recycle
    pools.run(rank_id, 1, timeout=30, env={"EXTRA": "x"})
    assert pools.recycles == {"another world size or environment": 1}
    assert len(pools.live_pids()) == 3


def test_a_started_call_runs_beside_the_pools_and_is_collected_once(pools: RankPools) -> None:
    started = pools.start(rank_id, 2, timeout=30, env={"EXTRA": "background"})
    assert started.ended is False
    warm = [r["pid"] for r in pools.run(rank_id, 2, timeout=30)]
    assert sorted(pools.live_pids()) == sorted(warm + started.pids())
    results = started.result()
    assert [r["extra"] for r in results] == ["background", "background"]
    assert [r["pid"] for r in results] == started.pids()
    assert not set(started.pids()) & set(warm)
    assert sorted(pools.live_pids()) == sorted(warm)
    assert started.ended and (started.kwargs, started.timeout) == ({}, 30)
    with pytest.raises(
        RuntimeError, match=re.escape("the started call tests.unit.test_rank_pool:rank_id was already collected")
    ):
        started.result()
    started.cancel()
    assert summary(pools.stats()) == "paddle_ranks: 2 pool starts, 2 calls served, 0 recycles"


def test_a_started_call_that_fails_or_overstays_raises_when_collected(pools: RankPools) -> None:
    failing = pools.start(raise_on_one, 2, timeout=30)
    with pytest.raises(RankCallFailed) as failed:
        failing.result()
    assert (failed.value.rank, failed.value.reason) == (1, "rank raised")
    slow = pools.start(sleep_long, 1, timeout=1.5)
    with pytest.raises(RankCallHung, match=r"^ranks \[0\] of 1 hung in tests.unit.test_rank_pool:sleep_long"):
        slow.result()
    assert pools.recycles == {"rank raised": 1, "rank hung": 1}
    assert pools.live_pids() == []


def sleep_briefly(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# Ranks that take 3 s to join the world, longer than the calls' timeouts below.
SLOW_JOIN_BOOTSTRAP = FAKE_BOOTSTRAP.replace(
    "from multiprocessing", "import time; time.sleep(3); from multiprocessing"
)


@pytest.mark.parametrize("started", [False, True])
def test_a_calls_timeout_counts_from_the_moment_every_rank_joined(started: bool) -> None:
    pools = RankPools(bootstrap=SLOW_JOIN_BOOTSTRAP)
    try:
        if started:
            assert pools.start(sleep_briefly, 2, kwargs={"seconds": 0.5}, timeout=2.0).result() == [0.5, 0.5]
        else:
            assert pools.run(sleep_briefly, 2, kwargs={"seconds": 0.5}, timeout=2.0, fresh=True) == [0.5, 0.5]
    finally:
        pools.close()


def test_a_started_call_left_uncollected_or_cancelled_is_killed(pools: RankPools, monkeypatch) -> None:
    forgotten = pools.start(sleep_long, 2, timeout=60)
    cancelled = pools.start(sleep_long, 1, timeout=60, kwargs={})
    cancelled.cancel()
    assert cancelled.ended and not forgotten.ended
    assert all(procfs.stat(pid) is None for pid in cancelled.pids())
    assert pools.live_pids() == forgotten.pids()
    ended = record_pool_endings(monkeypatch)
    pools.close()
    # Killed, not given the grace that ranks which finished their call get.
    assert ended == ["kill"]
    assert all(procfs.stat(pid) is None for pid in forgotten.pids())
    assert pools.recycles == {"cancelled": 1, "never collected": 1}
    assert pools.live_pids() == []


def test_start_refuses_bad_arguments_and_retires_a_world_that_fails_to_launch(
    pools: RankPools, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="nranks must be a positive integer, got 0"):
        pools.start(rank_id, 0, timeout=1.0)
    with pytest.raises(ValueError, match="fn must be defined at module level"):
        pools.start(lambda: 0, 1, timeout=1.0)
    assert pools.starts == 0
    monkeypatch.setattr(rank_pool.RankPool, "send", lambda self, target, kwargs: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError, match="x"):
        pools.start(rank_id, 1, timeout=5.0)
    assert (pools.starts, pools.recycles) == (1, {"error in the test process": 1})
    assert pools.live_pids() == [] and pools._alive == []


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((0, None, 1.0, None), ValueError, "nranks must be a positive integer, got 0"),
        ((True, None, 1.0, None), ValueError, "nranks must be a positive integer, got True"),
        ((2.0, None, 1.0, None), ValueError, "nranks must be a positive integer, got 2.0"),
        (("2", None, 1.0, None), ValueError, "nranks must be a positive integer, got '2'"),
        ((2, None, 0, None), ValueError, "timeout must be a finite number of seconds > 0, got 0"),
        ((2, None, -1.5, None), ValueError, "timeout must be a finite number of seconds > 0, got -1.5"),
        ((2, None, float("inf"), None), ValueError, "timeout must be a finite number of seconds > 0, got inf"),
        ((2, None, float("nan"), None), ValueError, "timeout must be a finite number of seconds > 0, got nan"),
        ((2, None, True, None), ValueError, "timeout must be a finite number of seconds > 0, got True"),
        ((2, None, "1", None), ValueError, "timeout must be a finite number of seconds > 0, got '1'"),
        ((2, [1], 1.0, None), TypeError, "kwargs must be a mapping of argument names to values, got [1]"),
        ((2, {1: "x"}, 1.0, None), TypeError, "kwargs must be a mapping of argument names to values, got {1: 'x'}"),
        (
            (2, {"x": 1, "gen": (i for i in ())}, 1.0, None),
            TypeError,
            "the test process cannot send kwargs['gen'] to the ranks: a generator that cannot be pickled (TypeError: "
            "cannot pickle 'generator' object)",
        ),
        ((2, None, 1.0, {"A": 1}), TypeError, "env must map variable names to strings, got {'A': 1}"),
        ((2, None, 1.0, {1: "a"}), TypeError, "env must map variable names to strings, got {1: 'a'}"),
        ((2, None, 1.0, ["A"]), TypeError, "env must map variable names to strings, got ['A']"),
    ],
)
def test_bad_call_arguments_are_refused_before_anything_starts(args, error, message) -> None:
    with pytest.raises(error) as raised:
        check_call(*args)
    assert str(raised.value).startswith(message)


def test_good_call_arguments_come_back_as_plain_dicts() -> None:
    class DictSubclass(dict):
        pass

    kwargs, env = check_call(1, DictSubclass(x=(1, 2)), 0.5, DictSubclass(A="1"))
    assert (kwargs, env) == ({"x": (1, 2)}, {"A": "1"})
    assert type(kwargs) is dict and type(env) is dict
    assert check_call(3, None, 7, None) == ({}, {})


class Holder:
    @staticmethod
    def nested_target() -> int:
        return 1


class NotCallable:
    """Named like a module-level function (module, qualified name, found there), but not callable."""

    def __init__(self) -> None:
        self.__qualname__ = "NOT_CALLABLE"


NOT_CALLABLE = NotCallable()


def test_only_module_level_functions_can_be_targets() -> None:
    assert CallTarget.of(rank_id) == CallTarget("tests.unit.test_rank_pool", "rank_id", __file__)
    with pytest.raises(ValueError, match="must be defined at module level"):
        CallTarget.of(lambda: None)
    with pytest.raises(TypeError, match="fn must be a module-level function"):
        CallTarget.of(3)
    with pytest.raises(
        TypeError,
        match=re.escape("fn must be a module-level function, got <tests.unit.test_rank_pool.NotCallable object"),
    ):
        CallTarget.of(NOT_CALLABLE)
    # Callable, with a module name, but no qualified name to import it by.
    with pytest.raises(TypeError, match=re.escape("fn must be a module-level function, got functools.partial(")):
        CallTarget.of(functools.partial(rank_id))


def test_a_function_its_module_does_not_hold_or_whose_module_is_not_loaded_is_refused() -> None:
    def nowhere() -> None:
        pass

    nowhere.__qualname__ = "nowhere"
    with pytest.raises(ValueError, match=re.escape("fn is not what tests.unit.test_rank_pool:nowhere names, so")):
        CallTarget.of(nowhere)
    nowhere.__module__ = "fdp_module_nobody_loaded"
    with pytest.raises(ValueError, match=re.escape("fn is not what fdp_module_nobody_loaded:nowhere names, so")):
        CallTarget.of(nowhere)


def test_a_target_in_a_module_without_a_file_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fdp_module_without_file")
    exec("def target():\n    return 1\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert CallTarget.of(module.target) == CallTarget("fdp_module_without_file", "target", None)


def test_a_target_may_sit_in_a_class_but_not_in_main() -> None:
    assert CallTarget.of(Holder.nested_target) == CallTarget(
        "tests.unit.test_rank_pool", "Holder.nested_target", __file__
    )

    def in_main() -> None:
        pass

    in_main.__module__, in_main.__qualname__ = "__main__", "in_main"
    with pytest.raises(ValueError) as err:
        CallTarget.of(in_main)
    assert str(err.value) == (
        "fn must be defined at module level of an importable module (the ranks import it by name), got "
        "__main__:in_main"
    )


def test_keep_open_and_exit_after_reply_outside_a_rank() -> None:
    with pytest.raises(TypeError, match="keep_open\\(\\) keeps SignalGroups"):
        rank_calls.keep_open(1, object())
    assert rank_calls.keep_open("same") == "same"
    with pytest.raises(RuntimeError, match="works only inside a rank function"):
        rank_calls.exit_after_reply(1)


def test_a_skip_in_a_rank_is_told_apart_from_a_raise() -> None:
    with pytest.raises(pytest.skip.Exception) as skipped:
        pytest.skip("why")
    assert pool_rank._is_skip(skipped.value)
    assert not pool_rank._is_skip(ValueError("x"))


def renamed() -> int:
    return 0


def test_a_function_its_module_name_does_not_lead_to_is_refused() -> None:
    impostor = renamed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules[__name__], "renamed", rank_id)
        with pytest.raises(ValueError, match=re.escape("fn is not what tests.unit.test_rank_pool:renamed names")):
            CallTarget.of(impostor)


def test_a_pool_serves_exactly_its_call_limit_then_is_recycled(
    pools: RankPools, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_world, "MAX_CALLS_PER_POOL", 3)
    first = pools.run(rank_id, 1, timeout=30)[0]["pid"]
    assert pools.run(rank_id, 1, timeout=30)[0]["pid"] == first
    assert pools.recycles == {} and pools.live_pids() == [first]
    # The call that reaches the limit still returns its results; only then is the pool thrown away.
    assert pools.run(rank_id, 1, timeout=30)[0]["pid"] == first
    assert pools.recycles == {"call limit": 1} and pools.live_pids() == []
    assert pools.run(rank_id, 1, timeout=30)[0]["pid"] != first


def test_a_pool_is_recycled_once_a_rank_grew_past_the_memory_limit_since_it_joined(
    pools: RankPools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scripted resident size: 10,000 bytes when the rank joined, then growth of exactly the limit (kept), then
    one byte more (recycled after that call)."""
    monkeypatch.setattr(pool_world, "MAX_RSS_GROWTH_BYTES", 100)
    resident = [10_000]
    monkeypatch.setattr(pool_world, "rss_bytes", lambda pid: resident[0])
    first = pools.run(rank_id, 1, timeout=30)[0]["pid"]
    resident[0] = 10_100
    assert pools.run(rank_id, 1, timeout=30)[0]["pid"] == first
    assert pools.recycles == {} and pools.live_pids() == [first]
    resident[0] = 10_101
    assert pools.run(rank_id, 1, timeout=30)[0]["pid"] == first
    assert pools.recycles == {"memory limit": 1} and pools.live_pids() == []


def test_a_rank_that_died_between_calls_fails_the_next_call_not_its_send(pools: RankPools) -> None:
    first = pools.run(rank_id, 2, timeout=30)
    os.kill(first[1]["pid"], signal.SIGKILL)
    # Dead (a zombie: its sockets are closed), but not reaped, so that the pool still reads its exit status.
    wait_until_a_zombie(first[1]["pid"])
    with pytest.raises(RankCallFailed) as err:
        pools.run(rank_id, 2, timeout=30)
    assert (err.value.rank, err.value.returncode, err.value.reason) == (1, -signal.SIGKILL, "rank died")
    assert "it exited before replying, exit code -9 (SIGKILL)" in str(err.value)
    assert pools.recycles == {"rank died": 1} and pools.live_pids() == []


def test_a_ranks_resident_size_is_procfs_and_a_rank_gone_meanwhile_reads_as_nothing(monkeypatch) -> None:
    monkeypatch.setattr(procfs, "rss_bytes", {11: 5 << 20, 12: None}.get)
    assert pool_world.rss_bytes(11) == 5 << 20
    assert pool_world.rss_bytes(12) == 0


class NoReply:
    """A rank's connection with nothing to read: records how long ``_read`` was ready to wait."""

    def __init__(self) -> None:
        self.polls: list[float | None] = []

    def poll(self, timeout: float | None = 0.0) -> bool:
        self.polls.append(timeout)
        return False


def test_reading_a_rank_that_sent_nothing_never_waits() -> None:
    conn = NoReply()
    assert pool_world._read(conn) is None
    assert conn.polls == [0]


def test_a_call_that_cannot_be_pickled_names_itself() -> None:
    pool = rank_pool.RankPool(1, {}, bootstrap=FAKE_BOOTSTRAP)
    with pytest.raises(TypeError) as err:
        pool.send(CallTarget.of(rank_id), {"gen": (i for i in ())})
    assert str(err.value).startswith(
        "the test process cannot send the call tests.unit.test_rank_pool:rank_id to the ranks: "
    )
    assert pool.calls == 0


def test_a_pool_claims_a_port_per_rank_and_one_for_the_store_and_logs_in_a_directory_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claimed = record_argument(monkeypatch, pool_world, "free_ports", "count")
    pool = rank_pool.RankPool(2, {}, bootstrap=FAKE_BOOTSTRAP)
    try:
        pool.start(CallTarget.of(rank_id), timeout=30)
        logs = [r.log_path for r in pool._ranks]
        assert claimed == [3]
        assert [path.name for path in logs] == ["rank0.log", "rank1.log"]
        assert logs[0].parent == logs[1].parent and logs[0].parent.name.startswith("fdp-pool-")
    finally:
        pool.kill()
    assert not logs[0].parent.exists()


def test_closing_a_pool_twice_or_one_never_started_does_nothing() -> None:
    unstarted = rank_pool.RankPool(1, {}, bootstrap=FAKE_BOOTSTRAP)
    unstarted.close()
    pool = rank_pool.RankPool(1, {}, bootstrap=FAKE_BOOTSTRAP)
    pool.start(CallTarget.of(rank_id), timeout=30)
    (pid,) = pool.pids()
    pool.close()
    pool.close()
    pool.kill()
    assert procfs.stat(pid) is None
    assert pool._workdir is None


def test_a_connection_that_breaks_while_reading_counts_as_no_message() -> None:
    class Broken:
        def poll(self, timeout: float) -> bool:
            return True

        def recv_bytes(self) -> bytes:
            raise EOFError

    class Silent:
        def poll(self, timeout: float) -> bool:
            return False

    assert pool_world._read(Broken()) is None
    assert pool_world._read(Silent()) is None


def test_a_pool_that_fails_to_start_is_retired_with_the_reason_and_the_error_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pools = RankPools(bootstrap=FAKE_BOOTSTRAP)

    def refuse(self: rank_pool.RankPool, target: CallTarget, timeout: float = 0) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rank_pool.RankPool, "start", refuse)
    with pytest.raises(KeyboardInterrupt):
        pools.run(rank_id, 1, timeout=30)
    assert (pools.starts, pools.calls, pools.recycles) == (1, 0, {"interrupted": 1})
    assert pools.live_pids() == []


def test_saving_coverage_where_nothing_is_measured_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import coverage

    monkeypatch.setattr(coverage.Coverage, "current", staticmethod(lambda: None))
    assert rank_calls.save_coverage() is None


def echo(value: object) -> object:
    return value


def test_values_cross_as_pickles_both_ways_even_64_mib_at_once(pools: RankPools) -> None:
    import numpy as np

    value = {1: (2, 3), (4,): {5, 6}, "b": b"\x00\xff", "a": np.arange(6, dtype=np.float16).reshape(3, 2)}
    first, second = pools.run(echo, 2, kwargs={"value": value}, timeout=30)
    assert second.keys() == value.keys()
    assert first.keys() == value.keys() and first[1] == (2, 3) and first[(4,)] == {5, 6} and first["b"] == b"\x00\xff"
    assert (first["a"].dtype, first["a"].shape, first["a"].tolist()) == (np.float16, (3, 2), value["a"].tolist())
    big = np.arange(64 << 20, dtype=np.uint8)
    results = pools.run(echo, 2, kwargs={"value": big}, timeout=60)
    assert all(result.nbytes == 64 << 20 and np.array_equal(result, big) for result in results)


def change_everything(seed: int) -> dict:
    import random
    import signal
    import warnings

    import numpy as np

    drawn = {"random": random.random(), "numpy": float(np.random.rand()), "env": os.environ.get("FDP_LEAK")}
    drawn.update(cwd=os.getcwd(), first_path=sys.path[0], filters=len(warnings.filters))
    # What the rank inherited: Python's handler, or SIG_IGN under a shell's background job. The call replaces it with
    # a handler of its own, which no rank starts with.
    drawn["sigint"] = str(signal.getsignal(signal.SIGINT))
    os.environ["FDP_LEAK"] = "left"
    os.chdir("/")
    sys.path.insert(0, "/fdp-leak")
    warnings.simplefilter("error")
    random.seed(seed)
    np.random.seed(seed)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    return drawn


def test_each_call_starts_from_the_state_the_rank_joined_with(pools: RankPools) -> None:
    first = pools.run(change_everything, 2, kwargs={"seed": 1}, timeout=30)
    pids = pools.live_pids()
    again = pools.run(change_everything, 2, kwargs={"seed": 2}, timeout=30)
    assert again == first
    assert first[0]["env"] is None and first[0]["first_path"] != "/fdp-leak"
    assert first[0]["sigint"] in (str(signal.default_int_handler), str(signal.SIG_IGN))
    assert first[0]["cwd"] == os.getcwd()
    assert pools.live_pids() == pids and pools.recycles == {}


def leave_a_thread() -> int:
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    return os.getpid()


def leave_a_child() -> int:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=False)
    return os.getpid()


def leave_a_thread_and_a_child() -> int:
    leave_a_thread()
    return leave_a_child()


def test_a_call_that_leaves_a_thread_or_a_child_running_recycles_the_pool_and_says_why(pools: RankPools) -> None:
    pids = pools.run(leave_a_thread, 2, timeout=30)
    assert pools.live_pids() == [] and all(procfs.stat(pid) is None for pid in pids)
    pools.run(leave_a_child, 1, timeout=30)
    assert pools.live_pids() == []
    assert summary(pools.stats()) == (
        "paddle_ranks: 2 pool starts, 2 calls served, 2 recycles (state left behind: 1 child process: 1, "
        "state left behind: 1 thread: 1)"
    )
    pools.run(leave_a_thread_and_a_child, 1, timeout=30)
    assert pools.recycles["state left behind: 1 thread, 1 child process"] == 1


def test_killing_a_pool_gives_its_ranks_the_pools_own_short_grace(pools: RankPools, monkeypatch) -> None:
    graces = record_argument(monkeypatch, pool_world, "kill_ranks", "grace")
    pools.start(rank_id, 1, timeout=30).cancel()
    # Not the launcher's longer default: a Ctrl-C must end pytest within seconds.
    assert graces == [pool_world.KILL_GRACE_S] and pool_world.KILL_GRACE_S < rank_processes.KILL_GRACE_S


def interrupt_the_wait(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """The next wait for replies gives the ranks a moment to get into their call, then raises ``exc``, as a signal
    handler would."""
    real_wait = rank_processes.wait

    def wait(objects, timeout):
        real_wait(objects, 0.3)
        raise exc

    monkeypatch.setattr(rank_processes, "wait", wait)


def test_a_ctrl_c_during_a_call_kills_the_ranks_before_it_goes_on(pools: RankPools, monkeypatch) -> None:
    pids = [r["pid"] for r in pools.run(rank_id, 2, timeout=30)]
    interrupt_the_wait(monkeypatch, KeyboardInterrupt())
    ended = record_pool_endings(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pools.run(sleep_long, 2, timeout=30)
    # Killed at once, not given the grace of ranks that are asked to leave (they are busy in the call).
    assert ended == ["kill"]
    assert all(procfs.stat(pid) is None for pid in pids)
    assert pools.recycles == {"interrupted": 1} and pools._alive == []


def test_an_outcome_raised_in_a_call_fails_it_with_every_ranks_stack(pools: RankPools, monkeypatch) -> None:
    pids = [r["pid"] for r in pools.run(rank_id, 2, timeout=30)]
    interrupt_the_wait(monkeypatch, pytest.fail.Exception("Timeout >5.0s"))
    with pytest.raises(rank_pool.RankCallInterrupted) as interrupted:
        pools.run(sleep_long, 2, timeout=30)
    text = str(interrupted.value)
    assert text.startswith("Failed: Timeout >5.0s, while 2 rank(s) ran tests.unit.test_rank_pool:sleep_long; their")
    for rank in (0, 1):
        assert "in sleep_long" in interrupted.value.reports[rank]
    assert isinstance(interrupted.value.__cause__, pytest.fail.Exception)
    assert all(procfs.stat(pid) is None for pid in pids)
    assert pools.recycles == {"interrupted": 1}


def test_a_second_ctrl_c_while_the_ranks_are_killed_cannot_spare_one(pools: RankPools, monkeypatch) -> None:
    pids = [r["pid"] for r in pools.run(rank_id, 2, timeout=30)]
    interrupt_the_wait(monkeypatch, KeyboardInterrupt("first"))
    real_wait = subprocess.Popen.wait

    def interrupted_grace(self, timeout=None):
        if timeout is not None:
            raise KeyboardInterrupt("second")
        return real_wait(self)

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted_grace)
    with pytest.raises(KeyboardInterrupt, match="second"):
        # Ranks that ignore SIGTERM: only the SIGKILL the second interrupt must not skip ends them.
        pools.run(sleep_ignoring_sigterm, 2, timeout=30)
    assert all(procfs.stat(pid) is None for pid in pids)


def test_closing_the_session_kills_every_pool_whatever_interrupts_it(pools: RankPools) -> None:
    pooled = [r["pid"] for r in pools.run(rank_id, 1, timeout=30)]
    started = pools.start(sleep_long, 1, timeout=30)

    def interrupted(self, reason="cancelled"):
        raise KeyboardInterrupt

    # Undone before the fixture closes the pools again (the autouse fixtures' monkeypatch outlives it).
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(rank_pool.StartedCall, "cancel", interrupted)
        pools.close()
    assert all(procfs.stat(pid) is None for pid in pooled + started.pids())
    assert pools._alive == []


def test_a_failed_pidfd_open_leaves_no_rank_running(pools: RankPools, monkeypatch) -> None:
    started: list[int] = []

    def refuse(pid: int) -> int:
        started.append(pid)
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(rank_processes.os, "pidfd_open", refuse)
    with pytest.raises(OSError, match="Function not implemented"):
        pools.run(rank_id, 2, timeout=30)
    assert len(started) == 1 and procfs.stat(started[0]) is None
    assert pools.recycles == {"error in the test process": 1}


# Rank 0 exits as a rank 0 whose master port was taken, the first FDP_TEST_TAKEN times it starts.
PORT_TAKEN_BOOTSTRAP = FAKE_BOOTSTRAP.replace(
    "from multiprocessing",
    "import os, pathlib; mark = pathlib.Path(os.environ['FDP_TEST_MARK'] + os.environ['PADDLE_TRAINER_ID']); "
    "starts = int(mark.read_text()) + 1 if mark.exists() else 1; mark.write_text(str(starts)); "
    "os.environ['PADDLE_TRAINER_ID'] == '0' and starts <= int(os.environ['FDP_TEST_TAKEN']) and sys.exit(75); "
    "from multiprocessing",
)


@pytest.mark.parametrize("started", [False, True])
def test_a_world_whose_master_port_was_taken_starts_again_on_other_ports(tmp_path, started: bool) -> None:
    pools = RankPools(bootstrap=PORT_TAKEN_BOOTSTRAP)
    env = {"FDP_TEST_MARK": str(tmp_path / "starts"), "FDP_TEST_TAKEN": "2"}
    try:
        if started:
            results = pools.start(rank_id, 2, timeout=30, env=env).result()
        else:
            results = pools.run(rank_id, 2, timeout=30, env=env)
        assert [r["rank"] for r in results] == [0, 1]
        assert (tmp_path / "starts0").read_text() == "3"
        assert pools.recycles == {}
    finally:
        pools.close()


def test_a_master_port_taken_every_time_fails_the_call_after_the_last_attempt(tmp_path) -> None:
    pools = RankPools(bootstrap=PORT_TAKEN_BOOTSTRAP)
    env = {"FDP_TEST_MARK": str(tmp_path / "starts"), "FDP_TEST_TAKEN": "99"}
    try:
        with pytest.raises(RankCallFailed) as failed:
            pools.run(rank_id, 2, timeout=30, env=env)
    finally:
        pools.close()
    assert (failed.value.rank, failed.value.returncode, failed.value.reason) == (0, 75, "port taken")
    assert (tmp_path / "starts0").read_text() == str(pool_world.PORT_ATTEMPTS)
    assert pools.recycles == {"port taken": 1}


# --- what mutmut found unpinned: the started call's clocks, its kill, and the reports of a rank that left --------


def test_an_outcome_while_a_started_call_is_collected_names_the_call_and_kills_its_ranks(
    pools: RankPools, monkeypatch
) -> None:
    started = pools.start(sleep_long, 2, timeout=30)
    interrupt_the_wait(monkeypatch, pytest.fail.Exception("Timeout >5.0s"))
    with pytest.raises(rank_pool.RankCallInterrupted) as interrupted:
        started.result()
    assert str(interrupted.value).startswith(
        "Failed: Timeout >5.0s, while 2 rank(s) ran tests.unit.test_rank_pool:sleep_long; their stacks:"
    )
    assert all(procfs.stat(pid) is None for pid in started.pids())
    assert pools.recycles == {"interrupted": 1}


def test_an_outcome_while_a_call_is_started_names_the_call_and_kills_the_ranks_already_running(
    pools: RankPools, monkeypatch
) -> None:
    launched: list[int] = []
    real_launch = rank_pool.RankPool.launch

    def launch(pool: rank_pool.RankPool) -> None:
        real_launch(pool)
        launched.extend(pool.pids())

    def send(pool: rank_pool.RankPool, target, kwargs) -> None:
        raise pytest.fail.Exception("Timeout >5.0s")

    monkeypatch.setattr(rank_pool.RankPool, "launch", launch)
    monkeypatch.setattr(rank_pool.RankPool, "send", send)
    with pytest.raises(rank_pool.RankCallInterrupted) as interrupted:
        pools.start(rank_id, 2, timeout=30)
    assert str(interrupted.value).startswith(
        "Failed: Timeout >5.0s, while 2 rank(s) ran tests.unit.test_rank_pool:rank_id; their stacks:"
    )
    assert len(launched) == 2 and all(procfs.stat(pid) is None for pid in launched)
    assert pools.recycles == {"interrupted": 1} and pools.live_pids() == []


@pytest.mark.parametrize("late", [False, True])
def test_a_started_call_waits_for_the_join_until_its_start_deadline_then_for_its_own_timeout_from_the_join(
    pools: RankPools, monkeypatch, late: bool
) -> None:
    asked: list[tuple[str, float]] = []
    real_joined, real_replies = rank_pool.RankPool.wait_joined, rank_pool.RankPool.replies

    # Each wait records the bound result() asks for, then waits generously: the ranks' pace is not under test.
    def wait_joined(pool, target, timeout):
        asked.append((f"joined {target}", timeout))
        ready_at = real_joined(pool, target, 60.0)
        # Late: the ranks joined long ago, longer than the call's own timeout.
        return ready_at - 100.0 if late else ready_at

    def replies(pool, target, timeout):
        asked.append((f"replies {target}", timeout))
        return real_replies(pool, target, 60.0)

    started = pools.start(rank_id, 2, timeout=30)
    before = time.monotonic()
    if late:
        started._start_deadline = before - 5
    monkeypatch.setattr(rank_pool.RankPool, "wait_joined", wait_joined)
    monkeypatch.setattr(rank_pool.RankPool, "replies", replies)
    assert [r["rank"] for r in started.result()] == [0, 1]
    (joined, join_bound), (answered, reply_bound) = asked
    assert (joined, answered) == (
        "joined tests.unit.test_rank_pool:rank_id",
        "replies tests.unit.test_rank_pool:rank_id",
    )
    if late:
        # Both deadlines have passed: nothing is waited for beyond what is already there.
        assert (join_bound, reply_bound) == (0.0, 0.0)
    else:
        assert rank_pool.START_TIMEOUT_S - (time.monotonic() - before) - 1 <= join_bound <= rank_pool.START_TIMEOUT_S
        assert 30 - (time.monotonic() - before) - 1 <= reply_bound <= 30


def test_a_started_call_that_cannot_join_by_its_start_deadline_is_reported_as_hung_while_starting(
    monkeypatch,
) -> None:
    monkeypatch.setattr(rank_pool, "START_TIMEOUT_S", 1.0)
    pools = RankPools(bootstrap=SLOW_JOIN_BOOTSTRAP)
    try:
        started = pools.start(rank_id, 1, timeout=30)
        with pytest.raises(RankCallHung, match=r"^ranks \[0\] of 1 hung in tests.unit.test_rank_pool:rank_id while"):
            started.result()
    finally:
        pools.close()


def record_pool_endings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``RankPool.kill`` and ``RankPool.close`` from now on, in order, as "kill" and "close"; both still run."""
    ended: list[str] = []
    real_kill, real_close = rank_pool.RankPool.kill, rank_pool.RankPool.close
    monkeypatch.setattr(rank_pool.RankPool, "kill", lambda pool, **kw: ended.append("kill") or real_kill(pool, **kw))
    monkeypatch.setattr(rank_pool.RankPool, "close", lambda pool: ended.append("close") or real_close(pool))
    return ended


def test_cancelling_a_started_call_kills_its_busy_ranks_instead_of_asking_them_to_leave(
    pools: RankPools, monkeypatch
) -> None:
    ended = record_pool_endings(monkeypatch)
    started = pools.start(sleep_long, 1, timeout=60)
    started.cancel()
    assert ended == ["kill"]
    assert all(procfs.stat(pid) is None for pid in started.pids())


# Rank 1 exits with code 3 before it joins; rank 0 joins.
EXIT_BEFORE_JOIN_BOOTSTRAP = FAKE_BOOTSTRAP.replace(
    "from multiprocessing", "os.environ['PADDLE_TRAINER_ID'] == '1' and os._exit(3); from multiprocessing"
)
# Rank 1 closes its end of the pipe and stays alive, as a rank whose exit is slow.
HANG_UP_AND_LINGER_BOOTSTRAP = FAKE_BOOTSTRAP.replace(
    "from multiprocessing",
    "os.environ['PADDLE_TRAINER_ID'] == '1' and (os.close(int(sys.argv[1])), __import__('time').sleep(60)); "
    "from multiprocessing",
)


def test_a_rank_that_exits_before_joining_is_reported_with_its_exit_and_when() -> None:
    pools = RankPools(bootstrap=EXIT_BEFORE_JOIN_BOOTSTRAP)
    try:
        with pytest.raises(RankCallFailed) as failed:
            pools.run(rank_id, 2, timeout=30)
    finally:
        pools.close()
    assert str(failed.value).startswith(
        "rank 1 of 2 failed in tests.unit.test_rank_pool:rank_id while the pool started: it exited before replying, "
        "exit code 3\n----- rank 1 -----\n"
    )
    assert (failed.value.returncode, failed.value.error, failed.value.reason) == (3, "", "rank died")


def test_a_rank_that_hangs_up_without_exiting_is_reported_as_dead_not_as_an_error_of_the_test_process() -> None:
    pools = RankPools(bootstrap=HANG_UP_AND_LINGER_BOOTSTRAP)
    try:
        with pytest.raises(RankCallFailed) as failed:
            pools.run(rank_id, 2, timeout=30)
        assert (failed.value.rank, failed.value.returncode, failed.value.reason) == (1, None, "rank died")
        assert pools.recycles == {"rank died": 1} and pools.live_pids() == []
    finally:
        pools.close()


# Rank 1 stays alive for a minute after the controller hung up, as a rank whose exit is stuck.
LINGER_AFTER_HANG_UP_BOOTSTRAP = FAKE_BOOTSTRAP.replace(
    "sys.exit(pool_rank.serve(Connection(int(sys.argv[1]))))",
    "code = pool_rank.serve(Connection(int(sys.argv[1]))); "
    "os.environ['PADDLE_TRAINER_ID'] == '1' and __import__('time').sleep(60); sys.exit(code)",
)


def test_closing_a_pool_shares_one_grace_among_its_ranks_then_kills_what_is_left(monkeypatch) -> None:
    monkeypatch.setattr(pool_world, "CLOSE_GRACE_S", 0.3)
    pools = RankPools(bootstrap=LINGER_AFTER_HANG_UP_BOOTSTRAP)
    try:
        pools.run(rank_id, 2, timeout=30)
        (pool,) = pools._pools.values()
        processes = [r.process for r in pool._ranks]
        asked: list[float | None] = []
        real_wait = subprocess.Popen.wait

        def wait(self, timeout=None):
            asked.append(timeout)
            if len(asked) == 1:
                # The first rank's wait outlasts the whole grace: the next rank gets none of it.
                time.sleep(0.5)
            return real_wait(self, timeout)

        monkeypatch.setattr(subprocess.Popen, "wait", wait)
        pool.close()
        monkeypatch.setattr(subprocess.Popen, "wait", real_wait)
    finally:
        pools.close()
    assert 0.0 < asked[0] <= 0.3 and asked[1] == 0.0
    # The lingering rank was killed, not waited for: close() returned with both gone.
    assert all(p.poll() is not None for p in processes) and processes[1].returncode < 0


def test_a_rank_log_tail_is_its_last_characters_with_undecodable_bytes_replaced(tmp_path) -> None:
    log = tmp_path / "rank0.log"
    log.write_bytes(b"x" * 10 + b"\xff" + b"y" * (rank_processes.LOG_TAIL_CHARS - 1))
    tail = rank_processes.RankProcess(0, None, log).log_tail()
    assert tail == "\ufffd" + "y" * (rank_processes.LOG_TAIL_CHARS - 1)


def test_an_outcome_while_a_new_pool_starts_names_the_call_and_kills_its_ranks(monkeypatch) -> None:
    pools = RankPools(bootstrap=SLOW_JOIN_BOOTSTRAP)
    try:
        interrupt_the_wait(monkeypatch, pytest.fail.Exception("Timeout >5.0s"))
        with pytest.raises(rank_pool.RankCallInterrupted) as interrupted:
            pools.run(rank_id, 2, timeout=30)
        assert str(interrupted.value).startswith(
            "Failed: Timeout >5.0s, while 2 rank(s) ran tests.unit.test_rank_pool:rank_id; their stacks:"
        )
        assert pools.recycles == {"interrupted": 1} and pools.live_pids() == [] and pools._alive == []
    finally:
        pools.close()


def test_a_fresh_world_is_killed_after_its_call_its_ranks_coverage_saved_with_their_reply(
    pools: RankPools, monkeypatch
) -> None:
    terms: list[bool] = []
    real_kill = rank_pool.RankPool.kill
    monkeypatch.setattr(
        rank_pool.RankPool, "kill", lambda pool, **kw: terms.append(kw["term"]) or real_kill(pool, **kw)
    )
    pools.run(rank_id, 1, timeout=30, fresh=True)
    pools.start(rank_id, 1, timeout=30).result()
    # Their ranks replied to everything: SIGKILL at once, no SIGTERM that would have them write their data again.
    assert terms == [False, False]
    assert pools.recycles == {}


def test_a_warm_pool_retired_after_its_call_is_closed_so_that_its_ranks_leave_on_their_own(
    pools: RankPools, monkeypatch
) -> None:
    monkeypatch.setattr(pool_world, "MAX_CALLS_PER_POOL", 1)
    ended = record_pool_endings(monkeypatch)
    pools.run(rank_id, 1, timeout=30)
    # close() hangs up, waits for the ranks to leave, then kills whatever is left (nothing, here).
    assert ended == ["close", "kill"]
    assert pools.recycles == {"call limit": 1}


def test_retiring_a_pool_that_was_already_retired_only_counts_the_reason(pools: RankPools) -> None:
    pools.run(rank_id, 1, timeout=30)
    (pool,) = pools._pools.values()
    pools._retire(pool, "first")
    pools._retire(pool, "again")
    assert pools.recycles == {"first": 1, "again": 1} and pools._alive == []


def test_a_pools_ranks_are_forked_unless_asked_not_to_a_bootstrap_of_their_own_or_a_refusal(monkeypatch) -> None:
    seen: list[tuple[dict, dict, str]] = []

    def refusal(env, parent_env, *, devices):
        seen.append((dict(env), dict(parent_env), devices))
        return "refused" if env.get("FDP_REFUSE") else None

    monkeypatch.setattr(warm_parent, "fork_refusal", refusal)
    monkeypatch.setattr(warm_parent, "shared_env", lambda: None)
    assert pool_world.RankPool(2, {}, fork=False)._spawn_reason({"A": "1"}) == "fork=False"
    own = pool_world.RankPool(2, {}, bootstrap="import sys")
    assert own._spawn_reason({"A": "1"}) == "the ranks run a bootstrap of their own"
    assert seen == []
    assert pool_world.RankPool(2, {"B": "x", "FLAGS_x": "1"})._spawn_reason({"A": "1"}) is None
    # No warm parent yet: the one that would start is what the world is compared with, with this process's
    # environment and the world's own variables, but for those read at start.
    assert seen[-1] == (
        {"A": "1"},
        warm_parent.parent_environment({**os.environ, "B": "x"}),
        "cpu",
    )
    monkeypatch.setattr(warm_parent, "shared_env", lambda: {"B": "2"})
    assert pool_world.RankPool(2, {}, devices="gpu")._spawn_reason({"FDP_REFUSE": "1"}) == "refused"
    assert seen[-1] == ({"FDP_REFUSE": "1"}, {"B": "2"}, "gpu")
