"""The package's public surface, and the message a user sees when Paddle is not installed."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import paddle
import pytest

import fastdeploy_patch
from fastdeploy_patch import group_shutdown, signal_group, status
from fastdeploy_patch.signal_group import group as group_module
from fastdeploy_patch.signal_group import rendezvous

REPO = Path(__file__).resolve().parents[2]


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
        "fastdeploy_patch needs PaddlePaddle 3.3. CPU: pip install 'fastdeploy-patch[cpu]'. GPU: PyPI has no Paddle 3 "
        "GPU wheel; install one from Paddle's own index for your CUDA version (cu126, cu129, ...: see "
        "https://www.paddlepaddle.org.cn/install/quick), for example: python -m pip install "
        "paddlepaddle-gpu==3.3.1 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/"
    )
    assert err.value.name == "paddle"
    if paddle_is == "missing":
        assert err.value.__cause__ is None
    else:
        assert err.value.__cause__ is _BrokenPaddle.error


class _PaddleThatFailsToLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A Paddle that is found but whose import fails while it runs (the usual form of a broken install)."""

    error = ImportError("libpaddle.so: undefined symbol")

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "paddle" else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: object) -> None:
        raise self.error


def test_a_paddle_that_fails_to_load_raises_the_same_message_when_a_public_name_is_first_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours = {name: module for name, module in sys.modules.items() if name.partition(".")[0] == "fastdeploy_patch"}
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "paddle")
    monkeypatch.setattr(sys, "meta_path", [_PaddleThatFailsToLoad(), *sys.meta_path])
    try:
        fresh = importlib.import_module("fastdeploy_patch")
        assert fresh.ModelWeightsStatus.CLEARING == -1
        with pytest.raises(ImportError) as err:
            fresh.new_signal_group  # noqa: B018 - the attribute access is the import under test
    finally:
        for name in [name for name in sys.modules if name.partition(".")[0] == "fastdeploy_patch"]:
            del sys.modules[name]
        sys.modules.pop("paddle", None)
    assert str(err.value).startswith("fastdeploy_patch needs PaddlePaddle 3.3. CPU: pip install")
    assert err.value.name == "paddle"
    assert err.value.__cause__ is _PaddleThatFailsToLoad.error


def test_a_name_that_is_not_public_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"^module 'fastdeploy_patch' has no attribute 'launcher'$"):
        fastdeploy_patch.launcher  # noqa: B018


def test_a_public_name_is_resolved_on_first_use_then_kept_on_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(vars(fastdeploy_patch), "shutdown_process_groups", raising=False)
    assert fastdeploy_patch.shutdown_process_groups is group_shutdown.shutdown_process_groups
    assert vars(fastdeploy_patch)["shutdown_process_groups"] is group_shutdown.shutdown_process_groups


def test_importing_the_package_imports_no_paddle_and_installs_no_warning_filter() -> None:
    probe = (
        "import json, sys, warnings; before = list(warnings.filters); import fastdeploy_patch; "
        "print(json.dumps({'paddle': 'paddle' in sys.modules, 'same_filters': warnings.filters == before}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"paddle": False, "same_filters": True}


def _probe(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_signal_groups_limits_import_no_paddle_and_its_api_imports_it_on_first_use() -> None:
    probe = (
        "import json, sys; from fastdeploy_patch.signal_group import MAX_LOOKAHEAD, TRANSPORTS, GLOO_OP_TIMEOUT_S; "
        "limits = 'paddle' in sys.modules; import fastdeploy_patch.signal_group as sg; api = sg.new_signal_group; "
        "print(json.dumps({'paddle_for_limits': limits, 'paddle_for_api': 'paddle' in sys.modules, "
        "'kept': vars(sg)['new_signal_group'] is api, 'values': [MAX_LOOKAHEAD, TRANSPORTS, GLOO_OP_TIMEOUT_S]}))"
    )
    assert _probe(probe) == {
        "paddle_for_limits": False,
        "paddle_for_api": True,
        "kept": True,
        "values": [32, ["auto", "shm", "gloo"], 30.0],
    }


def test_a_command_line_mistake_is_reported_without_importing_paddle() -> None:
    probe = (
        "import json, sys; from fastdeploy_patch.cli import main\n"
        "try:\n    main(['demo', '--lookahead', '99'])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(json.dumps({'code': code, 'paddle': 'paddle' in sys.modules}))"
    )
    assert _probe(probe) == {"code": 2, "paddle": False}


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("new_signal_group", group_module),
        ("broadcast_signal", group_module),
        ("SignalGroup", group_module),
        ("RENDEZVOUS_TIMEOUT_S", rendezvous),
    ],
)
def test_the_signal_groups_paddle_names_are_their_modules_own(name: str, module: object) -> None:
    assert getattr(signal_group, name) is getattr(module, name)


def test_a_name_the_signal_group_does_not_have_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"^module 'fastdeploy_patch.signal_group' has no attribute 'gloo'$"):
        signal_group.gloo  # noqa: B018


def test_the_modules_are_back_after_the_paddle_less_import() -> None:
    # Runs after the test above: later tests must see the very modules they imported.
    assert sys.modules["fastdeploy_patch"] is fastdeploy_patch
    assert sys.modules["fastdeploy_patch.signal_group"] is signal_group
    assert sys.modules["paddle"] is paddle
    assert fastdeploy_patch.ModelWeightsStatus is status.ModelWeightsStatus
