"""paddle_private: each private Paddle callable looked up once, and a loud error when Paddle lacks it."""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import paddle
import pytest
from paddle.distributed import collective

from fastdeploy_patch import paddle_internals
from fastdeploy_patch.paddle_internals import paddle_private


class CountingOwner:
    """A Paddle-like owner that counts how often each attribute is looked up."""

    __name__ = "fake.owner"

    def __init__(self, **attrs: object) -> None:
        self.lookups: dict[str, int] = {}
        self.attrs = attrs

    def __getattr__(self, name: str) -> object:
        self.lookups[name] = self.lookups.get(name, 0) + 1
        try:
            return self.attrs[name]
        except KeyError:
            raise AttributeError(name) from None


def _hook() -> str:
    return "hooked"


def _other() -> str:
    return "other"


def test_each_name_is_looked_up_once() -> None:
    owner = CountingOwner(_hook=_hook, _other=_other)
    assert [paddle_private(owner, "_hook") for _ in range(3)] == [_hook] * 3
    assert paddle_private(owner, "_other") is _other
    assert paddle_private(owner, "_hook")() == "hooked"
    assert owner.lookups == {"_hook": 1, "_other": 1}


def test_the_same_name_on_another_owner_is_its_own_lookup() -> None:
    first, second = CountingOwner(_hook=_hook), CountingOwner(_hook=_other)
    assert paddle_private(first, "_hook") is _hook
    assert paddle_private(second, "_hook") is _other
    assert first.lookups == second.lookups == {"_hook": 1}


@pytest.mark.parametrize("attrs", [{}, {"_hook": None}, {"_hook": 3}])
def test_a_missing_or_uncallable_name_names_the_installed_paddle(attrs: dict[str, object]) -> None:
    owner = CountingOwner(**attrs)
    expected = (
        f"fake.owner._hook is missing in the installed Paddle {paddle.__version__}; fastdeploy_patch relies on it "
        "and is tested with Paddle 3.3"
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(expected)}$"):
        paddle_private(owner, "_hook")


def test_an_owner_without_a_name_is_shown_as_itself() -> None:
    class Nameless:
        def __str__(self) -> str:
            return "<nameless owner>"

    with pytest.raises(RuntimeError, match=r"^<nameless owner>\._hook is missing in the installed Paddle "):
        paddle_private(Nameless(), "_hook")


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (collective, "_get_group_map_by_name"),
        (collective, "_get_shutdown_group_map_by_name"),
        (collective, "_set_default_store"),
        (paddle.Tensor, "_clear_data"),
        (paddle_internals.core, "create_or_get_global_tcp_store"),
    ],
)
def test_the_installed_paddle_has_every_private_the_package_uses(owner: object, name: str) -> None:
    assert paddle_private(owner, name) is getattr(owner, name)


def test_has_gloo_tells_whether_paddle_has_the_gloo_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    assert paddle_internals.has_gloo() is True
    monkeypatch.delattr(paddle_internals.core, "ProcessGroupGloo")
    assert paddle_internals.has_gloo() is False


def test_global_store_is_paddles_global_tcp_store(monkeypatch: pytest.MonkeyPatch) -> None:
    store = object()
    monkeypatch.setattr(paddle_internals.core, "create_or_get_global_tcp_store", lambda: store)
    assert paddle_internals.global_store() is store


def test_open_tcp_store_passes_its_arguments_in_paddles_order(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = mock.Mock()
    monkeypatch.setattr(paddle_internals.core, "TCPStore", opened)
    got = paddle_internals.open_tcp_store("10.0.0.1", 4321, is_master=True, num_workers=3, timeout_s=300)
    opened.assert_called_once_with("10.0.0.1", 4321, True, 3, 300)
    assert got is opened.return_value


@pytest.mark.parametrize("fails", [False, True])
def test_a_lent_default_store_is_taken_back_also_on_error(monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    lent, global_store = object(), object()
    defaults: list[object] = []
    monkeypatch.setattr(collective, "_set_default_store", defaults.append)
    monkeypatch.setattr(paddle_internals, "global_store", lambda: global_store)
    with contextlib.suppress(KeyError), paddle_internals.default_store_lent(lent):
        assert defaults == [lent]
        if fails:
            raise KeyError("new_group failed")
    assert defaults == [lent, global_store]
