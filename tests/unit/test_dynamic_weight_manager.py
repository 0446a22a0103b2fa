"""DynamicWeightManager on small real CPU models, with the collectives and group shutdown mocked.

GPU-only behaviour (the CUDA place a weight is reloaded onto, emptying the CUDA cache) runs here against fake
places and a fake CUDA build; tests/distributed/test_gpu.py checks the place on a real GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import numpy as np
import paddle
import pytest

from fastdeploy_patch import ModelWeightsStatus
from fastdeploy_patch.ipc_signal import StatusSignal
from fastdeploy_patch.rl import dynamic_weight_manager as dwm
from fastdeploy_patch.rl.dynamic_weight_manager import DynamicWeightManager, HostCopy, storage_place


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


@pytest.fixture
def mixed_model() -> paddle.nn.Layer:
    """Parameters that differ in every attribute a reload must keep: dtype, shape, stop_gradient, persistable."""
    paddle.seed(11)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 2))
    model[1].bias.stop_gradient = True
    model[1].weight.persistable = False
    scale = model.create_parameter([2, 3], dtype="bfloat16", default_initializer=paddle.nn.initializer.Normal())
    model.add_parameter("scale", scale)
    return model


def _attributes(model: paddle.nn.Layer) -> dict[str, tuple]:
    """Everything a reload must give back, per parameter: place, dtype, shape, flags, name and values."""
    return {
        name: (
            str(param.place),
            param.dtype,
            list(param.shape),
            param.persistable,
            param.stop_gradient,
            param.name,
            param.numpy().tobytes(),
        )
        for name, param in model.named_parameters()
    }


def test_mixed_model_fixture_covers_each_attribute_both_ways(mixed_model: paddle.nn.Layer) -> None:
    attributes = list(_attributes(mixed_model).values())
    assert {a[1] for a in attributes} == {paddle.float32, paddle.bfloat16}
    assert {a[3] for a in attributes} == {True, False}
    assert {a[4] for a in attributes} == {True, False}


def test_clear_then_update_gives_each_parameter_back_exactly(comm: Comm, mixed_model: paddle.nn.Layer) -> None:
    before = _attributes(mixed_model)
    manager = DynamicWeightManager(mixed_model)
    manager.clear_parameters()
    assert [param._is_initialized() for param in mixed_model.parameters()] == [False] * 5

    manager.update_parameters()

    assert _attributes(mixed_model) == before
    assert (manager.parameters_released, manager.parameters_restored) == (5, 5)
    # Still a trainable parameter: backward reaches it.
    mixed_model[0](paddle.ones([1, 3])).sum().backward()
    assert mixed_model[0].weight.grad is not None


def test_a_clear_retried_after_a_failed_shutdown_keeps_the_first_copies(
    comm: Comm, mixed_model: paddle.nn.Layer
) -> None:
    before = _attributes(mixed_model)
    comm.shutdown.side_effect = [RuntimeError("shutdown failed"), ["_default_pg1"]]
    with StatusSignal(create=True, initial=int(ModelWeightsStatus.CLEARING)) as signal:
        manager = DynamicWeightManager(mixed_model, status_signal=signal)
        with pytest.raises(RuntimeError, match=r"^shutdown failed$"):
            manager.clear_parameters()
        assert (manager.status, signal.value[0]) == (ModelWeightsStatus.NORMAL, ModelWeightsStatus.CLEARING)
        assert [param._is_initialized() for param in mixed_model.parameters()] == [False] * 5

        manager.clear_parameters()
        assert signal.value[0] == ModelWeightsStatus.CLEARED
        assert manager.parameters_released == 5
        assert comm.barrier.call_count == 2

        manager.update_parameters()
        assert signal.value[0] == ModelWeightsStatus.NORMAL
    assert _attributes(mixed_model) == before
    assert (manager.groups_shut_down, manager.groups_restarted) == (1, 1)


def test_a_parameter_released_before_the_clear_fails_the_reload_by_name(comm: Comm, model: paddle.nn.Layer) -> None:
    model[2].weight._clear_data()
    signal = _signal(int(ModelWeightsStatus.CLEARING))
    manager = DynamicWeightManager(model, status_signal=signal)
    manager.clear_parameters()
    assert manager.parameters_released == 3

    signal.value[0] = ModelWeightsStatus.UPDATING
    with pytest.raises(
        RuntimeError,
        match=r"^cannot reload parameter '2\.weight': it held no data when the weights were released, so no copy "
        r"of it was taken \(parameters without a copy: \['2\.weight'\]\)$",
    ):
        manager.update_parameters()
    # Checked before anything restarted or reloaded: the engine still sees the update pending.
    comm.restart.assert_not_called()
    assert [param._is_initialized() for param in model.parameters()] == [False] * 4
    assert (manager.status, signal.value[0]) == (ModelWeightsStatus.CLEARED, ModelWeightsStatus.UPDATING)
    assert manager.parameters_restored == 0


def _moment(signal: StatusSignal, model: paddle.nn.Layer) -> tuple[int, int]:
    """What the engine's status array holds now, and how many parameters hold data."""
    return int(signal.value[0]), sum(param._is_initialized() for param in model.parameters())


def test_the_engine_sees_cleared_only_after_release_cache_barrier_and_shutdown(
    comm: Comm, model: paddle.nn.Layer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int, int]] = []
    empty_cache = mock.Mock()
    monkeypatch.setattr(dwm.paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(dwm.paddle.device.cuda, "empty_cache", empty_cache)
    with StatusSignal(create=True, initial=int(ModelWeightsStatus.CLEARING)) as signal:
        empty_cache.side_effect = lambda: seen.append(("empty_cache", *_moment(signal, model)))
        comm.barrier.side_effect = lambda: seen.append(("barrier", *_moment(signal, model)))
        comm.shutdown.side_effect = lambda: seen.append(("shutdown", *_moment(signal, model))) or ["_default_pg1"]
        DynamicWeightManager(model, status_signal=signal).clear_parameters()
        final = int(signal.value[0])

    clearing = ModelWeightsStatus.CLEARING
    assert seen == [("empty_cache", clearing, 0), ("barrier", clearing, 0), ("shutdown", clearing, 0)]
    assert final == ModelWeightsStatus.CLEARED


def test_the_engine_sees_normal_only_after_restart_and_every_reload(comm: Comm, model: paddle.nn.Layer) -> None:
    seen: list[tuple[str, int, int]] = []
    real_restore = HostCopy.restore

    def restore(copy: HostCopy, param: paddle.Tensor) -> None:
        seen.append(("restore", *_moment(signal, model)))
        real_restore(copy, param)

    with StatusSignal(create=True, initial=int(ModelWeightsStatus.CLEARING)) as signal:
        manager = DynamicWeightManager(model, status_signal=signal)
        manager.clear_parameters()
        signal.value[0] = ModelWeightsStatus.UPDATING
        comm.restart.side_effect = lambda: seen.append(("restart", *_moment(signal, model)))
        with mock.patch.object(dwm.HostCopy, "restore", autospec=True, side_effect=restore):
            manager.update_parameters()
        final = int(signal.value[0])

    updating = ModelWeightsStatus.UPDATING
    assert seen == [("restart", updating, 0)] + [("restore", updating, loaded) for loaded in range(4)]
    assert final == ModelWeightsStatus.NORMAL
    assert sum(param._is_initialized() for param in model.parameters()) == 4


@pytest.mark.parametrize("cuda", [True, False])
def test_the_cuda_cache_is_emptied_only_on_a_cuda_build(
    comm: Comm, model: paddle.nn.Layer, monkeypatch: pytest.MonkeyPatch, cuda: bool
) -> None:
    empty_cache = mock.Mock()
    monkeypatch.setattr(dwm.paddle, "is_compiled_with_cuda", lambda: cuda)
    monkeypatch.setattr(dwm.paddle.device.cuda, "empty_cache", empty_cache)
    DynamicWeightManager(model).clear_parameters()
    assert empty_cache.call_args_list == ([mock.call()] if cuda else [])


@dataclass
class FakePlace:
    """Paddle's generic ``Place`` as a tensor reports it, for a device this machine does not have."""

    kind: str
    device_id: int = 0

    def is_cpu_place(self) -> bool:
        return self.kind == "cpu"

    def is_gpu_place(self) -> bool:
        return self.kind == "gpu"

    def gpu_device_id(self) -> int:
        assert self.kind == "gpu"
        return self.device_id

    def __str__(self) -> str:
        return f"Place({self.kind}:{self.device_id})"


@dataclass(frozen=True)
class FakeCUDAPlace:
    device_id: int


def test_storage_place_keeps_the_kind_and_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU-only Paddle refuses to build a CUDAPlace, so a stand-in records the device it was given.
    monkeypatch.setattr(dwm.paddle, "CUDAPlace", FakeCUDAPlace)
    assert storage_place(FakePlace("gpu", 3)) == FakeCUDAPlace(3)
    cpu = storage_place(FakePlace("cpu"))
    assert isinstance(cpu, paddle.CPUPlace)
    assert isinstance(storage_place(paddle.ones([1]).place), paddle.CPUPlace)


def test_storage_place_refuses_other_devices() -> None:
    with pytest.raises(
        RuntimeError, match=r"^cannot release weights stored on Place\(xpu:1\): only CPU and CUDA places can be "
    ):
        storage_place(FakePlace("xpu", 1))


def test_a_gpu_parameter_is_copied_with_its_gpu_and_restored_onto_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dwm.paddle, "CUDAPlace", FakeCUDAPlace)
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    dense = mock.Mock()
    param = SimpleNamespace(place=FakePlace("gpu", 1), numpy=lambda: values, get_tensor=lambda: dense)

    copy = HostCopy.of(param)
    values[0, 0] = 99  # the copy is the host's own, not a view of the device download
    assert copy.place == FakeCUDAPlace(1)
    assert np.array_equal(copy.values, np.arange(6, dtype=np.float32).reshape(2, 3))

    copy.restore(param)
    dense.set.assert_called_once_with(copy.values, FakeCUDAPlace(1))


def test_a_parameter_on_an_unsupported_device_stops_the_clear_before_anything_is_released(
    comm: Comm, model: paddle.nn.Layer, monkeypatch: pytest.MonkeyPatch
) -> None:
    places = iter([paddle.CPUPlace(), paddle.CPUPlace(), RuntimeError("cannot release weights stored on xpu")])

    def storage(place: object) -> object:
        found = next(places)
        if isinstance(found, Exception):
            raise found
        return found

    monkeypatch.setattr(dwm, "storage_place", storage)
    manager = DynamicWeightManager(model)
    with pytest.raises(RuntimeError, match=r"^cannot release weights stored on xpu$"):
        manager.clear_parameters()
    assert [param._is_initialized() for param in model.parameters()] == [True] * 4
    assert manager.parameters_released == 0
    comm.barrier.assert_not_called()
