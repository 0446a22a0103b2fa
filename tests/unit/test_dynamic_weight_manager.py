"""DynamicWeightManager on a small real CPU model, with the collectives and group shutdown mocked."""

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


@dataclass
class Comm:
    """The mocked collectives, attached to one parent mock so their order can be asserted."""

    calls: mock.Mock
    world_size: mock.Mock
    barrier: mock.Mock
    shutdown: mock.Mock
    restart: mock.Mock


@pytest.fixture
def comm() -> Iterator[Comm]:
    calls = mock.Mock()
    with (
        mock.patch.object(dwm.dist, "get_world_size", return_value=2) as world_size,
        mock.patch.object(dwm.dist, "barrier") as barrier,
        mock.patch.object(dwm.dist, "restart_process_group") as restart,
        mock.patch.object(dwm, "shutdown_process_groups", return_value=["_default_pg1", "_default_pg3"]) as shutdown,
    ):
        calls.attach_mock(barrier, "barrier")
        calls.attach_mock(shutdown, "shutdown_process_groups")
        calls.attach_mock(restart, "restart_process_group")
        yield Comm(calls, world_size, barrier, shutdown, restart)


@pytest.fixture
def model() -> paddle.nn.Layer:
    paddle.seed(7)
    return paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.ReLU(), paddle.nn.Linear(4, 2))


def _values(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    return {name: param.numpy().copy() for name, param in model.named_parameters()}


def _signal(value: int = 0) -> SimpleNamespace:
    return SimpleNamespace(value=np.array([value], dtype=np.int32))


def test_clear_releases_every_parameters_storage(comm: Comm, model: paddle.nn.Layer) -> None:
    manager = DynamicWeightManager(model)
    manager.clear_parameters()

    params = list(model.parameters())
    assert len(params) == 4
    assert [param._is_initialized() for param in params] == [False] * 4
    assert [param.numpy().size for param in params] == [0] * 4
    assert manager.parameters_released == 4
    assert manager.status is ModelWeightsStatus.CLEARED


def test_clear_waits_for_every_rank_then_shuts_groups_down(comm: Comm, model: paddle.nn.Layer) -> None:
    signal = _signal(int(ModelWeightsStatus.CLEARING))
    manager = DynamicWeightManager(model, status_signal=signal)
    manager.clear_parameters()

    assert comm.calls.mock_calls == [mock.call.barrier(), mock.call.shutdown_process_groups()]
    assert manager.groups_shut_down == 2
    assert signal.value[0] == ModelWeightsStatus.CLEARED


def test_a_single_rank_clears_without_a_barrier(comm: Comm, model: paddle.nn.Layer) -> None:
    comm.world_size.return_value = 1
    manager = DynamicWeightManager(model)
    manager.clear_parameters()

    comm.barrier.assert_not_called()
    comm.shutdown.assert_called_once_with()
    assert manager.status is ModelWeightsStatus.CLEARED


def test_clearing_twice_does_nothing_the_second_time(comm: Comm, model: paddle.nn.Layer) -> None:
    before = _values(model)
    manager = DynamicWeightManager(model)
    manager.clear_parameters()
    manager.clear_parameters()

    assert comm.calls.mock_calls == [mock.call.barrier(), mock.call.shutdown_process_groups()]
    assert (manager.parameters_released, manager.groups_shut_down) == (4, 2)
    # The first clear's host copy survives: the reload still brings back the original values.
    manager.update_parameters()
    assert all(np.array_equal(_values(model)[name], value) for name, value in before.items())


def test_update_restarts_groups_and_reloads_the_exact_values(comm: Comm, model: paddle.nn.Layer) -> None:
    before = _values(model)
    x = paddle.to_tensor([[0.5, -1.0, 2.0]])
    expected = model(x).numpy()
    signal = _signal()
    manager = DynamicWeightManager(model, status_signal=signal)
    manager.clear_parameters()
    comm.calls.reset_mock()

    manager.update_parameters()

    assert comm.calls.mock_calls == [mock.call.restart_process_group()]
    assert manager.groups_restarted == 2
    assert [param._is_initialized() for param in model.parameters()] == [True] * 4
    after = _values(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
    assert np.array_equal(model(x).numpy(), expected)
    assert manager.parameters_restored == 4
    assert manager.status is ModelWeightsStatus.NORMAL
    assert signal.value[0] == ModelWeightsStatus.NORMAL


def test_every_cycle_counts_its_own_groups(comm: Comm, model: paddle.nn.Layer) -> None:
    comm.shutdown.side_effect = [["_default_pg1", "_default_pg3"], ["_default_pg5"]]
    manager = DynamicWeightManager(model)
    for _ in range(2):
        manager.clear_parameters()
        manager.update_parameters()
    assert (manager.groups_shut_down, manager.groups_restarted) == (3, 3)
    assert (manager.parameters_released, manager.parameters_restored) == (8, 8)
    assert comm.restart.call_count == 2


@pytest.mark.parametrize("steps", [0, 1])
def test_update_needs_cleared_parameters(comm: Comm, model: paddle.nn.Layer, steps: int) -> None:
    manager = DynamicWeightManager(model)
    for _ in range(steps):
        manager.clear_parameters()
        manager.update_parameters()
    before = _values(model)
    with pytest.raises(
        RuntimeError, match=r"^update_parameters\(\) needs cleared parameters, but the status is NORMAL$"
    ):
        manager.update_parameters()
    assert comm.restart.call_count == steps
    assert manager.parameters_restored == 4 * steps
    assert all(np.array_equal(_values(model)[name], value) for name, value in before.items())


def test_without_a_status_signal_nothing_is_written(comm: Comm, model: paddle.nn.Layer) -> None:
    manager = DynamicWeightManager(model)
    manager.clear_parameters()
    manager.update_parameters()
    assert manager.status is ModelWeightsStatus.NORMAL
