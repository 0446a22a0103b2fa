"""fastdeploy_patch.testing.rank_imports: a rank imports Paddle with coverage paused, unless it could record Paddle."""

from __future__ import annotations

import sys
import types
import warnings

import pytest

from fastdeploy_patch.testing import rank_imports


class FakeCoverage:
    """A running measurement: records stop() and start(), with a configuration like coverage's."""

    def __init__(self, events: list[str], source=None, source_pkgs=(), run_include=()) -> None:
        self.events = events
        self.config = types.SimpleNamespace(
            source=source, source_pkgs=list(source_pkgs), run_include=list(run_include)
        )

    def stop(self) -> None:
        self.events.append("stop")

    def start(self) -> None:
        self.events.append("start")


def install_coverage(monkeypatch: pytest.MonkeyPatch, current) -> None:
    module = types.ModuleType("coverage")
    module.Coverage = types.SimpleNamespace(current=lambda: current)
    monkeypatch.setitem(sys.modules, "coverage", module)


def recording_load(events: list[str], error: BaseException | None = None):
    def load(name: str) -> types.ModuleType:
        events.append(f"import {name}")
        if error is not None:
            raise error
        return types.ModuleType(name)

    return load


@pytest.mark.parametrize(
    ("config", "paused"),
    [
        ({"source": ["fastdeploy_patch"]}, True),
        ({}, True),
        ({"source": ["fastdeploy_patch", "Paddle"]}, False),
        ({"source_pkgs": ["paddle.distributed"]}, False),
        ({"run_include": ["*/site-packages/paddle/*"]}, False),
    ],
)
def test_the_import_runs_outside_a_measurement_that_cannot_record_paddle(monkeypatch, config, paused) -> None:
    events: list[str] = []
    cov = FakeCoverage(events, **config)
    install_coverage(monkeypatch, cov)
    assert (rank_imports.running_coverage() is cov) is paused
    module = rank_imports.import_paddle(load=recording_load(events))
    assert module.__name__ == "paddle.distributed"
    expected = ["import paddle.distributed"]
    assert events == (["stop", *expected, "start"] if paused else expected)


def test_a_failed_import_starts_the_measurement_again_and_raises(monkeypatch) -> None:
    events: list[str] = []
    install_coverage(monkeypatch, FakeCoverage(events))
    with pytest.raises(ImportError, match=r"^no paddle here$"):
        rank_imports.import_paddle(load=recording_load(events, ImportError("no paddle here")))
    assert events == ["stop", "import paddle.distributed", "start"]


@pytest.mark.parametrize("coverage_module", ["absent", "nothing running", "no Coverage class"])
def test_without_a_running_measurement_it_only_imports(monkeypatch, coverage_module) -> None:
    if coverage_module == "absent":
        monkeypatch.delitem(sys.modules, "coverage", raising=False)
    elif coverage_module == "nothing running":
        install_coverage(monkeypatch, None)
    else:
        monkeypatch.setitem(sys.modules, "coverage", types.ModuleType("coverage"))
    assert rank_imports.running_coverage() is None
    events: list[str] = []
    rank_imports.import_paddle(load=recording_load(events))
    assert events == ["import paddle.distributed"]
    assert "coverage" not in sys.modules or coverage_module != "absent"


def test_paddles_ccache_hint_is_silenced_before_the_import(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "coverage", raising=False)
    seen: list[list[str]] = []

    def load(name: str) -> types.ModuleType:
        with warnings.catch_warnings(record=True) as caught:
            for module in ("paddle.utils.cpp_extension.extension_utils", "paddle.other"):
                warnings.warn_explicit("No ccache found", UserWarning, "x.py", 1, module=module, registry={})
        seen.append([str(w.message) for w in caught])
        return types.ModuleType(name)

    with warnings.catch_warnings():
        rank_imports.import_paddle(load=load)
    # Only the hint from Paddle's extension module is hidden.
    assert seen == [["No ccache found"]]


def test_by_default_it_imports_paddle_distributed(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "coverage", raising=False)
    with warnings.catch_warnings():
        assert rank_imports.import_paddle() is sys.modules["paddle.distributed"]
