"""Count the device work a profiled region launched, from ``paddle.profiler``'s result tree.

The signal group's promise on GPU runners is "no kernel, no device-host copy per step". This module turns a
profile into the numbers that promise is checked against; it is plain tree walking, so it is unit-tested with
fake trees on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from paddle.profiler import TracerEventType


@dataclass(frozen=True)
class DeviceEventCounts:
    """How many host events a profile holds, and how many device kernels, memcpys and memsets they launched."""

    host_events: int = 0
    kernels: int = 0
    memcpys: int = 0
    memsets: int = 0

    @property
    def device_events(self) -> int:
        """Every device event counted: kernels, memcpys and memsets."""
        return self.kernels + self.memcpys + self.memsets


def _host_nodes(roots: Iterable[Any]) -> Iterator[Any]:
    stack = list(roots)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children_node)


def _device_nodes(host_node: Any) -> Iterator[Any]:
    # A device event hangs off the runtime call (cudaLaunchKernel, cudaMemcpyAsync, ...) that issued it; Paddle
    # also attaches some directly to the host node.
    yield from host_node.device_node
    for runtime_node in host_node.runtime_node:
        yield from runtime_node.device_node


def count_device_events(nodetrees: Mapping[Any, Any]) -> DeviceEventCounts:
    """Count the events in ``nodetrees``, the ``{thread id: root node}`` mapping that
    ``Profiler.profiler_result.get_data()`` returns.

    Every host node of every thread is visited once (the roots included); device events are counted by type,
    and device events of any other type are ignored.
    """
    host_events = kernels = memcpys = memsets = 0
    for host_node in _host_nodes(nodetrees.values()):
        host_events += 1
        for device_node in _device_nodes(host_node):
            if device_node.type == TracerEventType.Kernel:
                kernels += 1
            elif device_node.type == TracerEventType.Memcpy:
                memcpys += 1
            elif device_node.type == TracerEventType.Memset:
                memsets += 1
    return DeviceEventCounts(host_events=host_events, kernels=kernels, memcpys=memcpys, memsets=memsets)
