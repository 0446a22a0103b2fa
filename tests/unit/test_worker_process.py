"""WorkerProcess: the signal group made once, the per-step status sync and what each status triggers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import numpy as np
import paddle
import pytest

from fastdeploy_patch import ModelWeightsStatus
from fastdeploy_patch.rl import dynamic_weight_manager as dwm
from fastdeploy_patch.rl.dynamic_weight_manager import DynamicWeightManager
from fastdeploy_patch.worker import worker_process
from fastdeploy_patch.worker.worker_process import SIGNAL_SRC, WorkerProcess

S = ModelWeightsStatus


@dataclass
class Rank:
    """This rank's view of the world, with the group creation, broadcast and weight manager mocked."""

    rank: mock.Mock
    world_size: mock.Mock
    new_signal_group: mock.Mock
    broadcast_signal: mock.Mock
    manager_cls: mock.Mock
    group: object

    @property
    def manager(self) -> mock.Mock:
        return self.manager_cls.return_value


@pytest.fixture
def rank() -> Iterator[Rank]:
    group = SimpleNamespace(name="_default_pg1")
    with (
        mock.patch.object(worker_process.dist, "get_rank", return_value=0) as get_rank,
        mock.patch.object(worker_process.dist, "get_world_size", return_value=2) as get_world_size,
        mock.patch.object(worker_process, "new_signal_group", return_value=group) as new_group,
        mock.patch.object(worker_process, "broadcast_signal", return_value=0) as broadcast,
        mock.patch.object(worker_process, "DynamicWeightManager", autospec=True) as manager_cls,
    ):
        yield Rank(get_rank, get_world_size, new_group, broadcast, manager_cls, group)


def _signal(value: int = 0) -> SimpleNamespace:
    return SimpleNamespace(value=np.array([value], dtype=np.int32))


def _model() -> mock.Mock:
    return mock.Mock(spec=paddle.nn.Layer)


def test_the_signal_group_is_created_once_at_start(rank: Rank) -> None:
    worker = WorkerProcess(
        _model(),
        status_signal=_signal(),
        signal_timeout=2.5,
        signal_create_timeout=12.0,
        signal_transport="shm",
        signal_lookahead=4,
    )
    rank.new_signal_group.assert_called_once_with(
        timeout=2.5, create_timeout=12.0, transport="shm", lookahead=4, initial=S.NORMAL
    )
    assert worker.signal_group is rank.group

    assert worker.event_loop(5) == 5
    assert rank.new_signal_group.call_count == 1
    assert rank.broadcast_signal.call_args_list == [mock.call(0, src=SIGNAL_SRC, group=rank.group)] * 5


def test_the_defaults_are_no_timeout_the_groups_creation_bound_the_auto_transport_and_lockstep(rank: Rank) -> None:
    WorkerProcess(_model(), status_signal=_signal())
    rank.new_signal_group.assert_called_once_with(
        timeout=None, create_timeout=300, transport="auto", lookahead=0, initial=S.NORMAL
    )


def test_a_single_rank_makes_no_group(rank: Rank) -> None:
    rank.world_size.return_value = 1
    worker = WorkerProcess(_model(), status_signal=_signal(1))
    rank.new_signal_group.assert_not_called()
    assert worker.signal_group is None
    rank.broadcast_signal.return_value = 1
    worker.event_loop_step()
    rank.broadcast_signal.assert_called_once_with(1, src=SIGNAL_SRC, group=None)


def test_rank_0_needs_the_engines_status_signal(rank: Rank) -> None:
    with pytest.raises(ValueError, match=r"^rank 0 reads the engine's weights status: pass status_signal$"):
        WorkerProcess(_model())
    rank.new_signal_group.assert_not_called()
    rank.manager_cls.assert_not_called()


def test_only_rank_0_keeps_and_hands_on_the_status_signal(rank: Rank) -> None:
    signal = _signal()
    model = _model()
    WorkerProcess(model, status_signal=signal)
    rank.rank.return_value = 1
    other = WorkerProcess(model, status_signal=signal)
    without = WorkerProcess(model)

    assert other.status_signal is None and without.status_signal is None
    assert rank.manager_cls.call_args_list == [
        mock.call(model, status_signal=signal),
        mock.call(model, status_signal=None),
        mock.call(model, status_signal=None),
    ]


def test_only_src_reads_the_shared_memory(rank: Rank) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal(int(S.UPDATING)))
    rank.broadcast_signal.return_value = 7
    group = object()

    assert worker._broadcast_model_weights_signal(0, group) == 7
    assert worker._broadcast_model_weights_signal(1, group) == 7
    assert rank.broadcast_signal.call_args_list == [mock.call(1, src=0, group=group), mock.call(0, src=1, group=group)]
    assert all(type(call.args[0]) is int for call in rank.broadcast_signal.call_args_list)


def test_a_rank_other_than_src_sends_zero(rank: Rank) -> None:
    rank.rank.return_value = 1
    worker = WorkerProcess(_model(), status_signal=_signal(int(S.CLEARING)))
    rank.broadcast_signal.return_value = int(S.CLEARING)
    assert worker.event_loop_step() is S.CLEARING
    rank.broadcast_signal.assert_called_once_with(0, src=0, group=rank.group)


def test_each_status_triggers_its_action_at_the_step_it_arrives(rank: Rank) -> None:
    model = _model()
    batch = paddle.ones([1, 3])
    worker = WorkerProcess(model, status_signal=_signal(), forward_input=batch)
    arriving = [0, 0, -1, -2, -2, 1, 0]
    rank.broadcast_signal.side_effect = arriving
    steps_at: list[tuple[str, int]] = []
    rank.manager.clear_parameters.side_effect = lambda: steps_at.append(("clear", worker.steps))
    rank.manager.update_parameters.side_effect = lambda: steps_at.append(("update", worker.steps))

    seen = [worker.event_loop_step() for _ in arriving]

    assert seen == [S(value) for value in arriving]
    assert all(type(status) is S for status in seen)
    assert worker.steps == 7 and worker.status is S.NORMAL
    assert worker.transitions == [(3, S.CLEARING), (4, S.CLEARED), (6, S.UPDATING), (7, S.NORMAL)]
    assert steps_at == [("clear", 3), ("update", 6)]
    # NORMAL steps 1, 2 and 7 ran the model; CLEARED steps did nothing.
    assert model.call_count == 3 and worker.forward_passes == 3
    assert all(call.args == (batch,) for call in model.call_args_list)
    assert len(worker.sync_latencies_ns) == 7
    assert all(isinstance(ns, int) and ns >= 0 for ns in worker.sync_latencies_ns)


def test_a_status_that_stays_in_effect_acts_once_on_its_transition(rank: Rank) -> None:
    """With lookahead d, CLEARING and UPDATING arrive on up to d + 1 consecutive steps: the weights are cleared and
    updated once each (a second update would find the parameters no longer cleared)."""
    model = _model()
    worker = WorkerProcess(model, status_signal=_signal(), forward_input=paddle.ones([1, 3]))
    arriving = [0, -1, -1, -1, -2, -2, 1, 1, 1, 0, 0]
    rank.broadcast_signal.side_effect = arriving
    steps_at: list[tuple[str, int]] = []
    rank.manager.clear_parameters.side_effect = lambda: steps_at.append(("clear", worker.steps))
    rank.manager.update_parameters.side_effect = lambda: steps_at.append(("update", worker.steps))

    assert [worker.event_loop_step() for _ in arriving] == [S(value) for value in arriving]

    assert steps_at == [("clear", 2), ("update", 7)]
    assert worker.transitions == [(2, S.CLEARING), (5, S.CLEARED), (7, S.UPDATING), (10, S.NORMAL)]
    # NORMAL steps 1, 10 and 11 ran the model, and only they.
    assert worker.forward_passes == 3 and model.call_count == 3


def test_each_step_records_how_long_the_status_sync_took(rank: Rank) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal())
    clock = [1_000, 1_250, 5_000, 5_090]
    with mock.patch.object(worker_process.time, "perf_counter_ns", side_effect=clock):
        worker.event_loop(2)
    assert worker.sync_latencies_ns == [250, 90]


def test_the_forward_pass_runs_without_autograd(rank: Rank) -> None:
    grad_enabled: list[bool] = []
    model = _model()
    model.side_effect = lambda _x: grad_enabled.append(paddle.is_grad_enabled())
    worker = WorkerProcess(model, status_signal=_signal(), forward_input=paddle.ones([1, 3]))
    worker.event_loop_step()
    assert grad_enabled == [False]
    assert paddle.is_grad_enabled()


def test_no_forward_input_means_no_forward_pass(rank: Rank) -> None:
    model = _model()
    worker = WorkerProcess(model, status_signal=_signal())
    worker.event_loop(3)
    model.assert_not_called()
    assert worker.forward_passes == 0 and worker.transitions == []


def test_an_unknown_status_is_refused_before_anything_happens(rank: Rank) -> None:
    model = _model()
    worker = WorkerProcess(model, status_signal=_signal(), forward_input=paddle.ones([1, 3]))
    rank.broadcast_signal.return_value = 5
    with pytest.raises(ValueError, match=r"^5 is not a valid ModelWeightsStatus$"):
        worker.event_loop_step()
    assert (worker.steps, worker.transitions, worker.sync_latencies_ns) == (0, [], [])
    model.assert_not_called()
    rank.manager.clear_parameters.assert_not_called()
    rank.manager.update_parameters.assert_not_called()


@pytest.mark.parametrize("max_steps", [0, -1, True, 2.0, "3", None])
def test_max_steps_must_be_a_positive_integer(rank: Rank, max_steps: object) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal())
    with pytest.raises(ValueError, match=rf"^max_steps must be a positive integer, got {max_steps!r}$"):
        worker.event_loop(max_steps)
    rank.broadcast_signal.assert_not_called()


def test_step_interval_must_not_be_negative(rank: Rank) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal())
    with pytest.raises(ValueError, match=r"^step_interval must be >= 0 seconds, got -0\.1$"):
        worker.event_loop(2, step_interval=-0.1)
    rank.broadcast_signal.assert_not_called()


@pytest.mark.parametrize(("interval", "sleeps"), [(0.25, [mock.call(0.25)] * 3), (0.0, []), (0, [])])
def test_the_loop_sleeps_the_interval_after_each_step(rank: Rank, interval: float, sleeps: list) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal())
    with mock.patch.object(worker_process.time, "sleep") as sleep:
        assert worker.event_loop(3, step_interval=interval) == 3
    assert sleep.call_args_list == sleeps
    assert worker.steps == 3


def test_a_loop_of_one_step_runs_that_step(rank: Rank) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal())
    assert worker.event_loop(1) == 1
    rank.broadcast_signal.assert_called_once_with(0, src=SIGNAL_SRC, group=rank.group)
    assert worker.steps == 1


def test_by_default_the_loop_runs_its_steps_back_to_back(rank: Rank) -> None:
    worker = WorkerProcess(_model(), status_signal=_signal())
    with mock.patch.object(worker_process.time, "sleep") as sleep:
        assert worker.event_loop(3) == 3
    sleep.assert_not_called()
    assert rank.broadcast_signal.call_count == 3


def test_a_real_model_is_released_and_reloaded_through_the_loop(rank: Rank) -> None:
    """The worker driving the real weight manager in a world of one rank."""
    rank.world_size.return_value = 1
    paddle.seed(3)
    model = paddle.nn.Linear(3, 2)
    before = {name: param.numpy().copy() for name, param in model.named_parameters()}
    signal = _signal()
    with (
        mock.patch.object(worker_process, "DynamicWeightManager", DynamicWeightManager),
        mock.patch.object(dwm, "shutdown_process_groups", return_value=[]),
        mock.patch.object(dwm.dist, "restart_process_group") as restart,
    ):
        worker = WorkerProcess(model, status_signal=signal, forward_input=paddle.ones([1, 3]))
        rank.broadcast_signal.side_effect = lambda value, src, group: value
        for value in (S.CLEARING, S.CLEARED, S.UPDATING, S.NORMAL):
            signal.value[0] = value
            worker.event_loop_step()
            if value is S.CLEARING:
                assert not any(param._is_initialized() for param in model.parameters())
                assert signal.value[0] == S.CLEARED
    restart.assert_called_once_with()
    assert signal.value[0] == S.NORMAL and worker.forward_passes == 1
    assert all(np.array_equal(param.numpy(), before[name]) for name, param in model.named_parameters())
