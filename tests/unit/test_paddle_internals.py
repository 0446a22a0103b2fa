"""paddle_private: each private Paddle callable looked up once, and a loud error when Paddle lacks it."""

from __future__ import annotations

import re

import paddle
import pytest
from paddle.distributed import collective

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
    ],
)
def test_the_installed_paddle_has_every_private_the_package_uses(owner: object, name: str) -> None:
    assert paddle_private(owner, name) is getattr(owner, name)
