"""The install story: the extras in pyproject.toml and the GPU install command in the README (test_import.py pins
the same command in the ImportError)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[2]
GPU_INSTALL = "python -m pip install paddlepaddle-gpu==3.3.1 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/"


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_dev_extra_installs_the_pre_commit_hooks_and_their_linter() -> None:
    assert _extras()["dev"] == ["pre-commit>=3", "ruff>=0.8"]
    # The hooks run ruff from the environment's own install, so the extra must carry it.
    hooks = (REPO / ".pre-commit-config.yaml").read_text()
    assert "entry: ruff check" in hooks and "entry: ruff format --check" in hooks


def test_the_gpu_extra_and_the_readme_name_the_same_paddle_release() -> None:
    assert _extras()["gpu"] == ["paddlepaddle-gpu>=3.3,<3.4", "setuptools"]
    readme = (REPO / "README.md").read_text()
    assert GPU_INSTALL in readme
    assert (
        "python -m pip install -e '.[gpu]' --extra-index-url https://www.paddlepaddle.org.cn/packages/stable/cu126/"
        in readme
    )


def test_the_wheel_lists_every_package_of_the_tree() -> None:
    # setuptools ships only the packages listed: a subpackage left out installs from a checkout (-e) but is missing
    # from a wheel.
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    tree = REPO / "fastdeploy_patch"
    found = [".".join(init.parent.relative_to(REPO).parts) for init in tree.rglob("__init__.py")]
    assert sorted(listed) == sorted(found)
