"""Fixtures for the gate's tests: the gate module, an isolated environment, a scratch repository."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from .scratch_repo import GATE_PATH, GateRun, Repo


@pytest.fixture(scope="session")
def gate() -> ModuleType:
    """ci/gate.py, imported from its path (ci/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("ci_gate", GATE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        # As `python ci/gate.py` does, so that the gate imports suite_data.py from beside it.
        patch.syspath_prepend(str(GATE_PATH.parent))
        spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite itself may run under coverage with patch=subprocess: its variables would make every child Python
    # (the measuring script, diff-cover) record into the outer run instead of the temp repository.
    for name in list(os.environ):
        if name.startswith("COVERAGE_"):
            monkeypatch.delenv(name)
    # The gate reads these; a developer's shell must not change what a test sees.
    monkeypatch.delenv("COMPARE_REF", raising=False)
    monkeypatch.delenv("GATE_FAIL_UNDER", raising=False)
    # Run under GitHub Actions, the gate would append the tests' reports to the real job summary.
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    # A user's git config (diff.renames=false, commit signing, a default branch name) must not change the diffs.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Gate Test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "gate-test@example.invalid")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    # What the gate prints must come out in order without it, as in tox, which does not pass it on.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A new repository on branch main with only an ignore file committed (the base commit comes from the test)."""
    created = Repo(tmp_path / "repo")
    created.path.mkdir()
    created.git("init", "--quiet", "--initial-branch=main")
    created.write(".gitignore", ".coverage\ncoverage.xml\nci-reports/\n__pycache__/\n")
    return created


@pytest.fixture
def run_gate(gate: ModuleType, capfd: pytest.CaptureFixture[str]) -> Callable[..., GateRun]:
    """Run the gate's main() in a repository, as `python ci/gate.py ARGS` would from its root; what it prints
    includes diff-cover's report, which the gate lets diff-cover print itself."""

    def run(repo: Repo, *args: str) -> GateRun:
        capfd.readouterr()
        code = gate.main(list(args), cwd=repo.path)
        captured = capfd.readouterr()
        return GateRun(code, captured.out, captured.err)

    return run
