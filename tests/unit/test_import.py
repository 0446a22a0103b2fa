"""The package's public surface, and the message a user sees when Paddle is not installed."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import sys

import paddle
import pytest

import fastdeploy_patch
from fastdeploy_patch import group_shutdown, signal_group, status


def test_the_public_api_is_the_modules_own_objects() -> None:
    assert fastdeploy_patch.__all__ == [
        "GLOO_OP_TIMEOUT_S",
        "ModelWeightsStatus",
        "SignalGroup",
        "SignalGroupError",
        "broadcast_signal",
        "new_signal_group",
        "shutdown_process_groups",
    ]
    assert fastdeploy_patch.new_signal_group is signal_group.new_signal_group
    assert fastdeploy_patch.broadcast_signal is signal_group.broadcast_signal
    assert fastdeploy_patch.SignalGroupError is signal_group.SignalGroupError
    assert fastdeploy_patch.SignalGroup is signal_group.SignalGroup
    assert fastdeploy_patch.GLOO_OP_TIMEOUT_S == 30.0
    assert fastdeploy_patch.shutdown_process_groups is group_shutdown.shutdown_process_groups
    assert fastdeploy_patch.ModelWeightsStatus is status.ModelWeightsStatus
    assert fastdeploy_patch.__version__ == importlib.metadata.version("fastdeploy-patch")


class _BrokenPaddle(importlib.abc.MetaPathFinder):
    """A Paddle that is installed but cannot load (for example a missing shared library)."""

    error = ImportError("libpaddle.so: cannot open shared object file")

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "paddle":
            raise self.error
        return None


@pytest.mark.parametrize("paddle_is", ["missing", "broken"])
def test_without_paddle_the_import_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, paddle_is: str
) -> None:
    ours = {name: module for name, module in sys.modules.items() if name.partition(".")[0] == "fastdeploy_patch"}
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    if paddle_is == "missing":
        # None in sys.modules makes `import paddle` raise ModuleNotFoundError, as when Paddle is not installed.
        monkeypatch.setitem(sys.modules, "paddle", None)
    else:
        monkeypatch.delitem(sys.modules, "paddle")
        monkeypatch.setattr(sys, "meta_path", [_BrokenPaddle(), *sys.meta_path])
    try:
        with pytest.raises(ImportError) as err:
            importlib.import_module("fastdeploy_patch")
    finally:
        # Drop the half-imported copies; monkeypatch then puts the original modules back.
        for name in [name for name in sys.modules if name.partition(".")[0] == "fastdeploy_patch"]:
            del sys.modules[name]
    assert str(err.value) == (
        "fastdeploy_patch needs PaddlePaddle: pip install 'fastdeploy-patch[cpu]' (or '[gpu]' on a CUDA machine)"
    )
    if paddle_is == "missing":
        assert isinstance(err.value.__cause__, ModuleNotFoundError)
    else:
        assert err.value.__cause__ is _BrokenPaddle.error


def test_the_modules_are_back_after_the_paddle_less_import() -> None:
    # Runs after the test above: later tests must see the very modules they imported.
    assert sys.modules["fastdeploy_patch"] is fastdeploy_patch
    assert sys.modules["fastdeploy_patch.signal_group"] is signal_group
    assert sys.modules["paddle"] is paddle
    assert fastdeploy_patch.ModelWeightsStatus is status.ModelWeightsStatus
