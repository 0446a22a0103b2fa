"""shutdown_process_groups over a stubbed Paddle group registry holding fake backends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import paddle
import pytest
from paddle.distributed import collective
from paddle.distributed.communication.group import Group

from fastdeploy_patch import group_shutdown
from fastdeploy_patch.group_shutdown import shutdown_process_groups

from .conftest import GlooLikePG, NonCallableShutdownPG, ShutdownablePG, make_group


@dataclass
class Registry:
    """Paddle's registry of named groups and its map of groups already shut down, both stubbed."""

    groups: dict[str, Group]
    down: dict[str, Group]
    # Spy on Paddle's real per-group shutdown_process_group, as group_shutdown calls it.
    shutdown: mock.Mock

    def snapshot(self) -> list[tuple[str, int]]:
        return [(name, id(group)) for name, group in self.groups.items()]

    def shut_groups(self) -> list[Group]:
        return [call.args[0] for call in self.shutdown.call_args_list]


@pytest.fixture
def registry() -> Iterator[Registry]:
    groups: dict[str, Group] = {}
    down: dict[str, Group] = {}
    with (
        mock.patch.object(collective, "_get_group_map_by_name", return_value=groups),
        mock.patch.object(collective, "_get_shutdown_group_map_by_name", return_value=down),
        # Paddle's shutdown_process_group records what it shut down through this; keep it in our map.
        mock.patch.object(collective, "_update_shutdown_group_map_by_name", side_effect=down.__setitem__),
        mock.patch.object(collective, "_clear_shutdown_group_map_by_name", side_effect=down.clear),
        mock.patch.object(
            group_shutdown.dist, "shutdown_process_group", wraps=paddle.distributed.shutdown_process_group
        ) as spy,
    ):
        yield Registry(groups, down, spy)


def _register(registry: Registry, *groups: Group) -> None:
    for group in groups:
        registry.groups[group.name] = group


def test_only_groups_that_can_be_shut_down_are(registry: Registry) -> None:
    default = make_group("_default_pg", 0, ShutdownablePG())
    nccl = make_group("_default_pg1", 1, ShutdownablePG())
    gloo = make_group("_default_pg2", 2, GlooLikePG())
    not_member = make_group("_default_pg3", 3, None, ranks=[2, 3], rank=-1)
    already_down = make_group("_default_pg4", 4, ShutdownablePG())
    odd = make_group("_default_pg5", 5, NonCallableShutdownPG())
    nccl_tp = make_group("_default_pg6", 6, ShutdownablePG())
    _register(registry, default, nccl, gloo, not_member, already_down, odd, nccl_tp)
    registry.down[already_down.name] = already_down
    before = registry.snapshot()

    assert shutdown_process_groups() == ["_default_pg1", "_default_pg6"]

    assert registry.shut_groups() == [nccl, nccl_tp]
    assert registry.shut_groups()[0] is nccl and registry.shut_groups()[1] is nccl_tp
    pgs = (default, nccl, already_down, nccl_tp)
    assert [group.process_group.shutdowns for group in pgs] == [0, 1, 0, 1]
    assert registry.snapshot() == before
    assert registry.down == {"_default_pg4": already_down, "_default_pg1": nccl, "_default_pg6": nccl_tp}


def test_the_default_group_is_known_by_its_id(registry: Registry) -> None:
    default = make_group("renamed_default", 0, ShutdownablePG())
    _register(registry, default)
    assert shutdown_process_groups() == []
    assert default.process_group.shutdowns == 0
    registry.shutdown.assert_not_called()


def test_gloo_groups_alone_raise_no_attribute_error(registry: Registry) -> None:
    signal = make_group("_default_pg1", 1, GlooLikePG())
    _register(registry, make_group("_default_pg", 0, GlooLikePG()), signal)
    before = registry.snapshot()

    assert shutdown_process_groups() == []

    registry.shutdown.assert_not_called()
    assert registry.snapshot() == before
    assert registry.down == {}


def test_a_second_call_shuts_nothing_down(registry: Registry) -> None:
    nccl = make_group("_default_pg1", 1, ShutdownablePG())
    _register(registry, make_group("_default_pg2", 2, GlooLikePG()), nccl)
    before = registry.snapshot()

    assert shutdown_process_groups() == ["_default_pg1"]
    assert shutdown_process_groups() == []

    assert nccl.process_group.shutdowns == 1
    assert registry.shutdown.call_count == 1
    assert registry.snapshot() == before


def test_an_error_midway_propagates_and_leaves_the_registry_alone(registry: Registry) -> None:
    first = make_group("_default_pg1", 1, ShutdownablePG())
    failing = make_group("_default_pg2", 2, ShutdownablePG(fail_with=RuntimeError("NCCL abort failed")))
    last = make_group("_default_pg3", 3, ShutdownablePG())
    _register(registry, make_group("_default_pg4", 4, GlooLikePG()), first, failing, last)
    before = registry.snapshot()

    with pytest.raises(RuntimeError, match=r"^NCCL abort failed$"):
        shutdown_process_groups()

    assert registry.snapshot() == before
    assert registry.shut_groups() == [first, failing]
    assert [group.process_group.shutdowns for group in (first, failing, last)] == [1, 1, 0]
    # The groups before the failure stay shut down; the failed one is not recorded as down.
    assert registry.down == {"_default_pg1": first}


def test_a_group_registered_during_the_walk_is_left_for_the_next_call(registry: Registry) -> None:
    late = make_group("_default_pg9", 9, ShutdownablePG())

    class RegisteringPG(ShutdownablePG):
        def shutdown(self) -> None:
            super().shutdown()
            registry.groups[late.name] = late

    _register(registry, make_group("_default_pg1", 1, RegisteringPG()))
    assert shutdown_process_groups() == ["_default_pg1"]
    assert late.process_group.shutdowns == 0
    assert shutdown_process_groups() == ["_default_pg9"]


def test_paddles_restart_brings_back_exactly_what_was_shut_down(registry: Registry) -> None:
    nccl = make_group("_default_pg1", 1, ShutdownablePG())
    default = make_group("_default_pg", 0, ShutdownablePG())
    _register(registry, default, make_group("_default_pg2", 2, GlooLikePG()), nccl)

    shutdown_process_groups()
    paddle.distributed.restart_process_group()

    assert (nccl.process_group.restarts, default.process_group.restarts) == (1, 0)
    assert registry.down == {}


def test_a_paddle_without_the_registry_fails_loudly() -> None:
    with (
        mock.patch.object(collective, "_get_group_map_by_name", None),
        pytest.raises(
            RuntimeError,
            match=re.escape(f"_get_group_map_by_name is missing in the installed Paddle {paddle.__version__}"),
        ),
    ):
        shutdown_process_groups()
