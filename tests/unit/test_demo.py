"""The demo's rank loop (in a world of one rank), the engine driver, the result checks and the summary table."""

from __future__ import annotations

import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from fastdeploy_patch import ipc_signal
from fastdeploy_patch.cli import demo
from fastdeploy_patch.cli.demo import Driver, check_demo, demo_rank, format_table, ranks_agree
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.status import ModelWeightsStatus

CLEARING, CLEARED, UPDATING, NORMAL = (
    ModelWeightsStatus.CLEARING,
    ModelWeightsStatus.CLEARED,
    ModelWeightsStatus.UPDATING,
    ModelWeightsStatus.NORMAL,
)


def _segment() -> types.SimpleNamespace:
    """Stands in for a StatusSignal: the driver only reads and writes ``value[0]``."""
    return types.SimpleNamespace(value=np.zeros(1, dtype=np.int32))


# --- demo_rank -------------------------------------------------------------------------------------------------


@pytest.fixture
def segments():
    with (
        StatusSignal(create=True) as status,
        StatusSignal(create=True) as progress,
        # Attaching in the process that created the segments would drop them from its resource tracker,
        # whose later unlink then logs a KeyError; the real attach is in another process.
        mock.patch.object(ipc_signal, "resource_tracker"),
    ):
        yield status, progress


def test_demo_rank_goes_through_the_cycle_the_driver_requests(segments) -> None:
    status, progress = segments
    driver = Driver(status, progress, steps=20)
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        # The engine gets one look after every step, which makes the run deterministic.
        pauses.append(seconds)
        driver.poll()

    with mock.patch.object(demo, "time", types.SimpleNamespace(sleep=pause)):
        result = demo_rank(status.name, progress.name, steps=20, step_interval=0.25)
    assert pauses == [0.25] * 20
    assert driver.done
    # CLEARING is asked for after step 5 and seen at step 6; CLEARED is held for 2 steps.
    assert result["transitions"] == [[6, "CLEARING"], [7, "CLEARED"], [9, "UPDATING"], [10, "NORMAL"]]
    assert {k: v for k, v in result.items() if not k.startswith("sync_")} == {
        "rank": 0,
        # A world of one rank has no signal group.
        "transport": "none",
        "lookahead": 0,
        "steps": 20,
        "transitions": result["transitions"],
        # Rank 0 read each status at the step it took effect: no lookahead.
        "published": result["transitions"],
        "parameters_released": 2,
        "parameters_restored": 2,
        "groups_shut_down": 0,
        "groups_restarted": 0,
        "forward_passes": 16,
    }
    assert 0 < result["sync_p50_us"] <= result["sync_p99_us"]
    assert int(progress.value[0]) == 20
    assert int(status.value[0]) == NORMAL


def test_demo_rank_gives_the_worker_the_transport_and_lookahead_and_reports_the_groups(segments) -> None:
    status, progress = segments
    group = types.SimpleNamespace(transport="shm")
    real = demo.StatusSignal

    def worker(model, **kwargs):
        made.append({**kwargs, "status_name": kwargs["status_signal"].name})
        fake = mock.Mock(rank=0, steps=0, transitions=[], sync_latencies_ns=[], forward_passes=0, signal_group=group)
        fake.weight_manager = mock.Mock(
            parameters_released=0, parameters_restored=0, groups_shut_down=0, groups_restarted=0
        )
        return fake

    made: list[dict] = []
    with (
        mock.patch("fastdeploy_patch.worker.worker_process.WorkerProcess", side_effect=worker),
        mock.patch.object(demo, "StatusSignal", side_effect=real),
    ):
        result = demo_rank(status.name, progress.name, steps=1, step_interval=0, transport="shm", lookahead=3)
    [kwargs] = made
    assert (kwargs["signal_transport"], kwargs["signal_lookahead"]) == ("shm", 3)
    # Rank 0's worker reads the engine's status through the watcher, which writes through to the segment.
    assert isinstance(kwargs["status_signal"], demo._WatchedStatus)
    assert kwargs["status_name"] == status.name
    assert (result["transport"], result["lookahead"]) == ("shm", 3)


def test_the_watched_status_notes_the_steps_at_which_the_value_read_changes() -> None:
    segment = _segment()
    watched = demo._WatchedStatus(segment)
    for step, engine in [(1, NORMAL), (2, NORMAL), (3, CLEARING), (4, CLEARING), (5, CLEARED)]:
        watched.value.step = step
        segment.value[0] = engine
        assert watched.value[0] == engine
        assert watched.value[0] == engine  # a second read in the same step notes nothing new
    watched.value[0] = UPDATING
    assert int(segment.value[0]) == UPDATING
    assert watched.value.changes == [[3, "CLEARING"], [5, "CLEARED"]]
    assert watched.value is watched.value and watched.value._array is segment.value


def test_demo_rank_on_rank_0_without_pauses_runs_every_step_at_normal(segments) -> None:
    status, progress = segments
    with mock.patch.object(demo, "time", types.SimpleNamespace(sleep=mock.Mock())) as fake_time:
        result = demo_rank(status.name, progress.name, steps=3, step_interval=0)
    fake_time.sleep.assert_not_called()
    assert (result["steps"], result["transitions"], result["forward_passes"]) == (3, [], 3)
    assert int(progress.value[0]) == 3


def test_demo_rank_on_another_rank_neither_reads_the_status_nor_reports_progress(segments) -> None:
    status, progress = segments
    status.value[0] = CLEARING
    with (
        mock.patch("paddle.distributed.get_rank", return_value=1),
        mock.patch.object(demo, "StatusSignal", side_effect=AssertionError("only rank 0 attaches")),
    ):
        result = demo_rank(status.name, progress.name, steps=2, step_interval=0)
    # The status comes from rank 0's broadcast (0 in a world of one), never from the segment.
    assert (result["rank"], result["transitions"], result["parameters_released"]) == (1, [], 0)
    assert int(progress.value[0]) == 0


def test_demo_rank_detaches_from_the_segments_when_the_worker_fails(segments) -> None:
    status, progress = segments
    attached: list[tuple[str, StatusSignal]] = []

    def attach(name: str) -> StatusSignal:
        attached.append((name, StatusSignal(name)))
        return attached[-1][1]

    with (
        mock.patch.object(demo, "StatusSignal", side_effect=attach),
        mock.patch("fastdeploy_patch.worker.worker_process.WorkerProcess", side_effect=RuntimeError("no model")),
        pytest.raises(RuntimeError, match="no model"),
    ):
        demo_rank(status.name, progress.name, steps=2, step_interval=0)
    assert [name for name, _ in attached] == [status.name, progress.name]
    assert all(signal._shm is None for _, signal in attached)


# --- Driver.poll ---------------------------------------------------------------------------------------------


def test_driver_runs_on_real_time_by_default_polling_every_millisecond() -> None:
    driver = Driver(_segment(), _segment(), 20)
    assert (driver.clock, driver.sleep, driver.out) == (time.monotonic, time.sleep, print)
    assert (driver.poll_interval, driver.progress_every, driver.error, driver.log) == (0.001, 2.0, None, [])


def test_driver_schedule_scales_with_the_steps() -> None:
    assert (Driver(_segment(), _segment(), 200).clear_at, Driver(_segment(), _segment(), 200).hold_steps) == (50, 20)
    assert (Driver(_segment(), _segment(), 3).clear_at, Driver(_segment(), _segment(), 3).hold_steps) == (1, 2)


def test_driver_poll_takes_one_phase_at_a_time_when_it_is_due() -> None:
    status, progress, said = _segment(), _segment(), []
    driver = Driver(status, progress, 20, out=said.append)
    driver.poll()
    assert said == [] and status.value[0] == NORMAL and driver.waiting_for == demo._PHASES[0]
    progress.value[0] = 4
    driver.poll()
    assert said == ["[engine] step 4/20: the ranks are running"] and status.value[0] == NORMAL
    progress.value[0] = 5
    driver.poll()
    assert said[-1] == "[engine] step 5/20: requested CLEARING (release the weights)"
    assert status.value[0] == CLEARING and driver.waiting_for == demo._PHASES[1]
    driver.poll()  # rank 0 has not answered yet
    assert len(said) == 2
    progress.value[0], status.value[0] = 7, CLEARED
    driver.poll()
    assert said[-1] == "[engine] step 7/20: rank 0 reports CLEARED: weights released, the trainer updates them"
    progress.value[0] = 8
    driver.poll()  # CLEARED is held for 2 steps
    assert len(said) == 3 and status.value[0] == CLEARED
    progress.value[0] = 9
    driver.poll()
    assert said[-1] == "[engine] step 9/20: requested UPDATING (reload the weights)" and status.value[0] == UPDATING
    driver.poll()
    assert len(said) == 4 and not driver.done
    progress.value[0], status.value[0] = 10, NORMAL
    driver.poll()
    assert said[-1] == "[engine] step 10/20: rank 0 reports NORMAL: weights restored"
    assert driver.done and driver.waiting_for == "the ranks to finish"
    driver.poll()
    assert len(said) == 5 and driver.log == said


def test_driver_ignores_a_normal_status_until_it_asked_for_the_update() -> None:
    status, progress = _segment(), _segment()
    driver = Driver(status, progress, 20, out=lambda line: None)
    progress.value[0] = 5
    driver.poll()
    status.value[0] = NORMAL  # not CLEARED: the weights were not released
    progress.value[0] = 30
    driver.poll()
    assert driver.waiting_for == demo._PHASES[1]


# --- Driver.run ----------------------------------------------------------------------------------------------


@dataclass
class Rank0:
    """Plays rank 0 on a fake clock: one step per driver pause, answering CLEARING and UPDATING a step later,
    and stopping (as run_ranks returning does) after ``last`` steps."""

    status: types.SimpleNamespace
    progress: types.SimpleNamespace
    last: int
    stop: threading.Event = field(default_factory=threading.Event)
    now: float = 0.0
    stuck: bool = False

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.stuck:
            return
        self.progress.value[0] += 1
        if self.status.value[0] == CLEARING:
            self.status.value[0] = CLEARED
        elif self.status.value[0] == UPDATING:
            self.status.value[0] = NORMAL
        if self.progress.value[0] >= self.last:
            self.stop.set()


def _run(rank0: Rank0, steps: int, timeout: float, progress_every: float = 1.0) -> tuple[Driver, list[str]]:
    said: list[str] = []
    driver = Driver(
        rank0.status,
        rank0.progress,
        steps,
        out=said.append,
        clock=rank0.clock,
        sleep=rank0.sleep,
        poll_interval=0.001,
        progress_every=progress_every,
    )
    driver.run(rank0.stop, timeout)
    return driver, said


def test_driver_run_drives_the_cycle_and_reports_progress_after_the_ranks_start() -> None:
    rank0 = Rank0(_segment(), _segment(), last=20)
    driver, said = _run(rank0, steps=20, timeout=10.0, progress_every=0.0095)
    assert driver.error is None and driver.done
    assert said == [
        "[engine] step 1/20: the ranks are running",
        "[engine] step 5/20: requested CLEARING (release the weights)",
        "[engine] step 6/20: rank 0 reports CLEARED: weights released, the trainer updates them",
        "[engine] step 8/20: requested UPDATING (reload the weights)",
        "[engine] step 9/20: rank 0 reports NORMAL: weights restored",
        "[engine] step 11/20: running",
    ]


def test_driver_run_keeps_going_past_its_deadline_once_the_cycle_is_done() -> None:
    rank0 = Rank0(_segment(), _segment(), last=100)
    driver, _ = _run(rank0, steps=20, timeout=0.05)
    assert driver.error is None and int(rank0.progress.value[0]) == 100


def test_driver_run_gives_up_at_its_deadline_naming_what_it_waited_for() -> None:
    rank0 = Rank0(_segment(), _segment(), last=100, stuck=True)
    driver, said = _run(rank0, steps=20, timeout=0.01)
    assert driver.error == "no sign of rank 0 reaching the step to request CLEARING within 0.01 s (rank 0 at step 0)"
    assert said == [] and not rank0.stop.is_set()


def test_driver_run_reports_ranks_that_stopped_before_the_cycle_ended() -> None:
    rank0 = Rank0(_segment(), _segment(), last=6)
    driver, said = _run(rank0, steps=20, timeout=10.0)
    # The last look after the ranks stopped still sees CLEARED, so the driver is in the hold.
    assert said[-1] == "[engine] step 6/20: rank 0 reports CLEARED: weights released, the trainer updates them"
    assert driver.error == "the ranks stopped at step 6 before the end of the CLEARED hold"


# --- check_demo, ranks_agree, format_table -------------------------------------------------------------------


CYCLE = [[8, "CLEARING"], [9, "CLEARED"], [12, "UPDATING"], [13, "NORMAL"]]


def _result(rank: int, **changes: object) -> dict:
    result = {
        "rank": rank,
        "transport": "shm",
        "lookahead": 0,
        "published": CYCLE if rank == 0 else [],
        "steps": 30,
        "transitions": [[8, "CLEARING"], [9, "CLEARED"], [12, "UPDATING"], [13, "NORMAL"]],
        "parameters_released": 2,
        "parameters_restored": 2,
        "groups_shut_down": 0,
        "groups_restarted": 0,
        "forward_passes": 25,
        "sync_p50_us": 147.04,
        "sync_p99_us": 1200.3,
    }
    return {**result, **changes}


def test_check_demo_accepts_ranks_that_saw_the_whole_cycle_together() -> None:
    assert check_demo([_result(0), _result(1)], steps=30) == []
    assert ranks_agree([_result(0), _result(1)])


def test_check_demo_wants_every_transition_of_the_cycle_in_order() -> None:
    partial = [[8, "CLEARING"], [9, "UPDATING"], [10, "NORMAL"]]
    results = [_result(0, transitions=partial, published=partial), _result(1, transitions=partial)]
    assert check_demo(results, steps=30) == [
        "rank 0 saw transitions CLEARING@8 UPDATING@9 NORMAL@10, expected CLEARING, CLEARED, UPDATING, NORMAL in "
        "that order"
    ]
    assert check_demo([_result(0, transitions=[], published=[])], steps=30) == [
        "rank 0 saw transitions none, expected CLEARING, CLEARED, UPDATING, NORMAL in that order"
    ]


def test_check_demo_wants_each_transition_exactly_the_lookahead_after_rank_0_read_it() -> None:
    read = [[8, "CLEARING"], [13, "CLEARED"], [20, "UPDATING"], [25, "NORMAL"]]
    shifted = [[12, "CLEARING"], [17, "CLEARED"], [24, "UPDATING"], [29, "NORMAL"]]
    ranks = [_result(r, lookahead=4, transitions=shifted, published=read if r == 0 else []) for r in (0, 1)]
    assert check_demo(ranks, steps=30) == []
    # What rank 0 read too late to take effect within the run is not expected.
    assert check_demo([{**ranks[0], "published": [*read, [27, "CLEARING"]]}, ranks[1]], steps=30) == []
    on_the_spot = [{**r, "transitions": read} for r in ranks]
    assert check_demo(on_the_spot, steps=30) == [
        "rank 0 read CLEARING@8 CLEARED@13 UPDATING@20 NORMAL@25 from the engine, so with lookahead 4 every rank "
        "should see CLEARING@12 CLEARED@17 UPDATING@24 NORMAL@29, but rank 0 saw "
        "CLEARING@8 CLEARED@13 UPDATING@20 NORMAL@25"
    ]


def test_check_demo_reports_a_rank_that_disagrees_with_rank_0() -> None:
    late = [[8, "CLEARING"], [10, "CLEARED"], [12, "UPDATING"], [13, "NORMAL"]]
    results = [_result(0), _result(1, transitions=late)]
    assert check_demo(results, steps=30) == [
        "rank 1 saw CLEARING@8 CLEARED@10 UPDATING@12 NORMAL@13 but rank 0 saw "
        "CLEARING@8 CLEARED@9 UPDATING@12 NORMAL@13"
    ]
    assert not ranks_agree(results)


def test_check_demo_reports_steps_and_parameters_that_do_not_add_up() -> None:
    results = [_result(0, steps=29), _result(1, parameters_restored=1), _result(2, parameters_released=0)]
    assert check_demo(results, steps=30) == [
        "rank 0 ran 29 steps, expected 30",
        "rank 1 released 2 parameters and restored 1",
        "rank 2 released 0 parameters and restored 2",
    ]
    assert not ranks_agree(results)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("|")]


def test_format_table_has_a_row_per_rank_in_aligned_columns_then_the_verdict() -> None:
    lines = format_table([_result(0), _result(1, sync_p50_us=99.96)]).splitlines()
    assert _cells(lines[0]) == [
        "rank",
        "transport",
        "steps",
        "transitions (status@step)",
        "params released/restored",
        "groups down/restarted",
        "sync p50 us",
        "sync p99 us",
    ]
    cycle = "CLEARING@8 CLEARED@9 UPDATING@12 NORMAL@13"
    assert _cells(lines[2]) == ["0", "shm", "30", cycle, "2/2", "0/0", "147.0", "1200.3"]
    assert _cells(lines[3]) == ["1", "shm", "30", cycle, "2/2", "0/0", "100.0", "1200.3"]
    assert set(lines[1]) == {"-", "+"}
    bars = [[i for i, ch in enumerate(line) if ch in "|+"] for line in lines[:4]]
    assert bars[0] == bars[1] == bars[2] == bars[3] and len(bars[0]) == 7
    assert all(line == line.rstrip() for line in lines)
    assert lines[4:] == [
        f"rank 0 read from the engine: {cycle} (lookahead 0: every rank acts on each at the same step)",
        "ranks agree: yes",
    ]


def test_format_table_says_how_much_later_the_ranks_act_with_a_lookahead() -> None:
    lines = format_table([_result(0, lookahead=4, published=[[3, "CLEARING"]])]).splitlines()
    assert lines[-2] == "rank 0 read from the engine: CLEARING@3 (lookahead 4: every rank acts on each 4 steps later)"


def test_format_table_says_when_the_ranks_disagree() -> None:
    table = format_table([_result(0), _result(1, steps=31)])
    assert table.splitlines()[-1] == "ranks agree: NO"


def test_the_commands_page_shows_both_verdict_lines_the_table_prints() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "commands.md").read_text()
    agree = [_result(0), _result(1)]
    disagree = [_result(0), _result(1, transitions=[[9, "CLEARING"]])]
    for results in (agree, disagree):
        verdict = format_table(results).splitlines()[-1]
        assert f"`{verdict}`" in page
