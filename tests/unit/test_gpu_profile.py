"""count_device_events: the profiler-result parsing behind the GPU no-kernel check, exercised with fake trees."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from paddle.profiler import TracerEventType

from fastdeploy_patch.testing.gpu_profile import DeviceEventCounts, count_device_events


def device(kind: TracerEventType) -> SimpleNamespace:
    return SimpleNamespace(type=kind)


def runtime(*devices: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(device_node=list(devices))


def host(*children: SimpleNamespace, runtime_node=(), device_node=()) -> SimpleNamespace:
    return SimpleNamespace(
        children_node=list(children), runtime_node=list(runtime_node), device_node=list(device_node)
    )


def test_empty_profile_counts_nothing() -> None:
    assert count_device_events({}) == DeviceEventCounts(host_events=0, kernels=0, memcpys=0, memsets=0)


def test_host_only_tree_counts_every_host_node_and_no_device_event() -> None:
    tree = {1: host(host(host()), host()), 2: host()}

    counts = count_device_events(tree)

    assert counts == DeviceEventCounts(host_events=5, kernels=0, memcpys=0, memsets=0)
    assert counts.device_events == 0


def test_device_events_under_runtime_nodes_are_counted_by_type() -> None:
    launch = runtime(device(TracerEventType.Kernel), device(TracerEventType.Kernel))
    copy = runtime(device(TracerEventType.Memcpy))
    fill = runtime(device(TracerEventType.Memset))
    tree = {7: host(host(runtime_node=[launch, copy]), host(runtime_node=[fill]))}

    counts = count_device_events(tree)

    assert counts == DeviceEventCounts(host_events=3, kernels=2, memcpys=1, memsets=1)
    assert counts.device_events == 4


def test_device_events_attached_directly_to_a_host_node_are_counted() -> None:
    tree = {3: host(device_node=[device(TracerEventType.Memcpy), device(TracerEventType.Kernel)])}

    assert count_device_events(tree) == DeviceEventCounts(host_events=1, kernels=1, memcpys=1, memsets=0)


def test_events_deep_in_every_thread_are_found() -> None:
    deep = host(runtime_node=[runtime(device(TracerEventType.Kernel))])
    tree = {
        1: host(host(host(deep))),
        2: host(runtime_node=[runtime(device(TracerEventType.Memcpy))]),
    }

    assert count_device_events(tree) == DeviceEventCounts(host_events=5, kernels=1, memcpys=1, memsets=0)


@pytest.mark.parametrize(
    "kind", [TracerEventType.CudaRuntime, TracerEventType.Operator, TracerEventType.Communication]
)
def test_other_device_event_types_are_ignored(kind: TracerEventType) -> None:
    tree = {1: host(runtime_node=[runtime(device(kind))], device_node=[device(kind)])}

    assert count_device_events(tree) == DeviceEventCounts(host_events=1, kernels=0, memcpys=0, memsets=0)
