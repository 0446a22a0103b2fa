"""The package layout and its import rule: the patch at the package root, the command in ``cli/``, the harness in
``testing/``.

The patch never imports ``cli/`` or ``testing/``; those two may import the patch, but take signal-group names only
from ``fastdeploy_patch.signal_group`` itself, never from its internal modules, with one exception: the diagnostics
that only tools use (``shm_diagnostics``) are imported from their own module, so the group's public API does not
carry them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fastdeploy_patch"
TOOLS = ("cli", "testing")
"""The subpackages that are tools beside the patch, not part of it."""
TOOLS_ONLY = ("shm_diagnostics",)
"""Modules of ``signal_group`` that serve the tools alone: the tools import them by their own name."""
ENTRY_POINTS = ("__main__.py",)
"""Root modules that only start the command (``python -m fastdeploy_patch``): they belong with ``cli/``."""

PATCH_ROOT = {
    "__init__.py",
    "__main__.py",
    "group_shutdown.py",
    "ipc_signal.py",
    "paddle_internals.py",
    "paddle_warnings.py",
    "procfs.py",
    "status.py",
    "rl",
    "signal_group",
    "worker",
}


def _module_name(path: Path, package: Path) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, package: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line: ``from a import b`` yields ``a.b`` (``b`` may be a
    submodule) as well as ``a``."""
    here = _module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def layout_violations(package: Path) -> list[str]:
    """What breaks the import rule under ``package``, one line each (``path:line: why``); empty when none does."""
    name = package.name
    tools = tuple(f"{name}.{tool}" for tool in TOOLS)
    signal_group = f"{name}.signal_group"
    problems = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        in_tools = rel.parts[0] in TOOLS or rel.as_posix() in ENTRY_POINTS
        for line, module in _imported_modules(path, package):
            where = f"{name}/{rel.as_posix()}:{line}"
            if not in_tools and any(module == tool or module.startswith(tool + ".") for tool in tools):
                problems.setdefault(where, f"{where}: the patch imports {module}")
            if in_tools and module.startswith(signal_group + "."):
                submodule = module[len(signal_group) + 1 :].split(".")[0]
                if submodule in TOOLS_ONLY:
                    continue
                if (package / "signal_group" / f"{submodule}.py").exists() or (
                    package / "signal_group" / submodule
                ).is_dir():
                    problems.setdefault(where, f"{where}: imports {module}; take it from {signal_group}")
    return list(problems.values())


def test_the_package_root_holds_the_patch_and_the_two_tool_packages_only() -> None:
    # Modules and packages only: a tool that works on a copy of the tree (mutmut) keeps its own files beside them.
    entries = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    assert entries == PATCH_ROOT | set(TOOLS)


def test_every_package_says_what_lives_there_and_who_may_import_it() -> None:
    for tool in TOOLS:
        doc = " ".join(ast.get_docstring(ast.parse((PACKAGE / tool / "__init__.py").read_text())).split())
        assert "the patch never imports anything from here" in doc, tool
        assert "takes signal-group names only from ``fastdeploy_patch.signal_group``" in doc, tool
    root = " ".join(ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())).split())
    assert "the patch never imports them" in root


def test_this_package_keeps_the_import_rule() -> None:
    assert layout_violations(PACKAGE) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "fastdeploy_patch"
    for rel, text in {
        "__init__.py": "",
        "cli/__init__.py": "",
        "testing/__init__.py": "",
        "signal_group/__init__.py": "",
        "signal_group/arguments.py": "",
        "signal_group/shm_diagnostics.py": "",
        **files,
    }.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    return package


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        (
            "status.py",
            "from fastdeploy_patch.cli import main\n",
            "status.py:1: the patch imports fastdeploy_patch.cli",
        ),
        ("status.py", "import fastdeploy_patch.testing.launcher\n", "the patch imports fastdeploy_patch.testing"),
        ("status.py", "from fastdeploy_patch import cli\n", "status.py:1: the patch imports fastdeploy_patch.cli"),
        ("rl/x.py", "\nfrom ..testing import launcher\n", "rl/x.py:2: the patch imports fastdeploy_patch.testing"),
        (
            "cli/doctor.py",
            "from fastdeploy_patch.signal_group.arguments import TRANSPORTS\n",
            "cli/doctor.py:1: imports fastdeploy_patch.signal_group.arguments; take it from "
            "fastdeploy_patch.signal_group",
        ),
        (
            "testing/pool.py",
            "from fastdeploy_patch.signal_group import arguments\n",
            "imports fastdeploy_patch.signal_group.arguments",
        ),
        ("cli/x.py", "from ..signal_group.arguments import MAX\n", "imports fastdeploy_patch.signal_group.arguments"),
    ],
)
def test_a_broken_import_rule_is_reported_with_its_file_and_line(
    tmp_path: Path, rel: str, source: str, expected: str
) -> None:
    problems = layout_violations(_tree(tmp_path, {rel: source}))
    assert len(problems) == 1, problems
    assert expected in problems[0]


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("cli/x.py", "from fastdeploy_patch.signal_group import TRANSPORTS, new_signal_group\n"),
        ("cli/doctor.py", "from fastdeploy_patch.signal_group.shm_diagnostics import leftover_segments\n"),
        ("testing/x.py", "from fastdeploy_patch.signal_group import shm_diagnostics\n"),
        ("testing/x.py", "from fastdeploy_patch import status\nimport fastdeploy_patch.signal_group\n"),
        ("cli/x.py", "from fastdeploy_patch.testing import launcher\nfrom . import demo\n"),
        ("signal_group/group.py", "from fastdeploy_patch.signal_group.arguments import TRANSPORTS\n"),
        ("status.py", "import fastdeploy_patch.client\n"),
        ("__main__.py", "from fastdeploy_patch.cli import main\n"),
    ],
)
def test_imports_the_rule_allows_are_not_reported(tmp_path: Path, rel: str, source: str) -> None:
    assert layout_violations(_tree(tmp_path, {rel: source})) == []
