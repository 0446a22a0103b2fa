""".ci/run and ci/unit_coverage.py on temporary repositories: which step fails for which change, with which exit code.

.ci/run runs here as CI runs it, with the real gate, the real unit-coverage step and the commands the real tox.ini
gives them; only the test suites are stood in for. ``CI_TOX`` points .ci/run at ``FAKE_TOX``: run without
arguments (the suites) it publishes the coverage data prepared for the suites a test says pass, then exits as tox
does; run as ``-e ENV`` it runs ENV's commands from tox.ini.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .scratch_repo import CHILD_TIMEOUT_S, GATE_PATH, Repo, run_python

pytestmark = pytest.mark.timeout(120)

ROOT = GATE_PATH.parents[1]
UNIT_COVERAGE_PATH = ROOT / "ci" / "unit_coverage.py"
README = ROOT / "README.md"

FAKE_TOX = """\
import configparser, json, os, pathlib, shlex, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_TOX_LOG"], "a", encoding="utf-8") as log:
    log.write((" ".join(args) or "(all)") + "\\n")
if not args:
    published = pathlib.Path("coverage-data")
    published.mkdir(exist_ok=True)
    for suite in json.loads(os.environ["FAKE_TOX_PASSING"]):
        # copy, not copy2: the data is written now, after the source, as a real run's is.
        shutil.copy(pathlib.Path(os.environ["FAKE_TOX_PREPARED"]) / f"{suite}.coverage", published)
    sys.exit(int(os.environ["FAKE_TOX_EXIT"]))
env = args[1]
config = configparser.ConfigParser(interpolation=None)
config.read("tox.ini", encoding="utf-8")
for line in config[f"testenv:{env}"]["commands"].replace("\\\\\\n", " ").strip().splitlines():
    argv = shlex.split(line)
    code = subprocess.run([sys.executable if argv[0] == "python" else argv[0], *argv[1:]]).returncode
    if code:
        sys.exit(code)
"""

BASE = """
    def add(a, b):
        return a + b
"""

# The change adds 10 coverable lines; only `describe(None)` runs line 6.
CHANGED = """
    def add(a, b):
        return a + b


    def describe(x):
        parts = []
        parts.append("x")
        parts.append(str(x))
        if x is None:
            return "none"
        total = len(parts)
        label = ",".join(parts)
        size = len(label)
        return f"{label}:{total}:{size}"
"""

ONLY_IMPORTED = "import fastdeploy_patch.calc as calc; calc.add(1, 2)"
COVERED_AT_90 = ONLY_IMPORTED + "; calc.describe(1)"
FULLY_COVERED = COVERED_AT_90 + "; calc.describe(None)"


def copy_ci_files(repo: Repo) -> None:
    """The project's CI scripts and configuration (pyproject.toml for coverage's: relative paths, branches)."""
    for relpath in (".ci/run", "ci/gate.py", "ci/suite_data.py", "ci/unit_coverage.py", "tox.ini", "pyproject.toml"):
        (repo.path / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relpath, repo.path / relpath)


def ci_repo(repo: Repo, tmp_path: Path, unit_calls: str) -> Path:
    """Commit the CI files and a fully tested package, then a change to it; prepare the suites' coverage data
    (the unit suite runs ``unit_calls``; the distributed one only imports the module). Returns the data folder."""
    copy_ci_files(repo)
    repo.write(".gitignore", "coverage.xml\nci-reports/\ncoverage-data/\n__pycache__/\n")
    repo.write("fastdeploy_patch/__init__.py", "")
    repo.write("fastdeploy_patch/calc.py", BASE)
    repo.commit("base")
    repo.write("fastdeploy_patch/calc.py", CHANGED)
    repo.commit("add describe")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for suite, calls in (("unit", unit_calls), ("distributed", "import fastdeploy_patch.calc")):
        repo.measure(calls, data_file=str(prepared / f"{suite}.coverage"), xml=False, source="fastdeploy_patch")
    return prepared


def run_ci(
    repo: Repo,
    tmp_path: Path,
    prepared: Path,
    *,
    passing: tuple[str, ...] = ("unit", "distributed"),
    tox_exit: int = 0,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the repository's .ci/run with the stand-in tox; return the result and the tox calls, in order."""
    fake = tmp_path / "fake_tox.py"
    fake.write_text(FAKE_TOX, encoding="utf-8")
    wrapper = tmp_path / "tox"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    log = tmp_path / "tox-calls.log"
    env = {
        **os.environ,
        "CI_TOX": str(wrapper),
        "FAKE_TOX_LOG": str(log),
        "FAKE_TOX_PREPARED": str(prepared),
        "FAKE_TOX_PASSING": json.dumps(list(passing)),
        "FAKE_TOX_EXIT": str(tox_exit),
    }
    result = subprocess.run(
        [str(repo.path / ".ci" / "run")],
        cwd=repo.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return result, calls


ALL_PASSED = [
    "ci: tests (tox: lint, workflow-lint, unit, distributed): passed (exit 0)",
    "ci: patch-coverage gate (tox -e gate): passed (exit 0)",
    "ci: unit coverage 100% (tox -e unit-coverage): passed (exit 0)",
    "ci: passed",
]


def readme_tox_call() -> str:
    """The tox call of the README's test command, as FAKE_TOX logs it: its arguments, or ``(all)`` without any."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- test command -->", 1)[1].split("<!-- end of test command -->", 1)[0]
    command = re.fullmatch(r"\s*```bash\n(.*)\n```\s*", block, re.S).group(1)
    [tox] = [argv for argv in (shlex.split(part) for part in command.split("&&")) if argv[0] == "tox"]
    return " ".join(tox[1:]) or "(all)"


def summary(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ci: ")]


def test_a_change_covered_below_80_percent_fails_at_the_gate_naming_the_file_and_lines(
    repo: Repo, tmp_path: Path
) -> None:
    prepared = ci_repo(repo, tmp_path, ONLY_IMPORTED)

    result, calls = run_ci(repo, tmp_path, prepared)

    assert result.returncode == 1, result.stdout + result.stderr
    assert calls == ["(all)", "-e gate", "-e unit-coverage"]
    assert "\nfastdeploy_patch/calc.py (10.0%): Missing lines 6-14\n" in result.stdout
    assert "\ngate: FAIL: patch coverage 10.0% is below the 80% threshold (HEAD against HEAD~1)\n" in result.stdout
    assert "\nCoverage failure: total of 21 is less than fail-under=100\n" in result.stdout
    assert summary(result.stdout) == [
        "ci: tests (tox: lint, workflow-lint, unit, distributed): passed (exit 0)",
        "ci: patch-coverage gate (tox -e gate): FAILED (exit 1)",
        "ci: unit coverage 100% (tox -e unit-coverage): FAILED (exit 1)",
        "ci: FAILED (exit 1)",
    ]


def test_a_change_covered_at_90_percent_passes_the_gate_then_fails_the_100_percent_step(
    repo: Repo, tmp_path: Path
) -> None:
    prepared = ci_repo(repo, tmp_path, COVERED_AT_90)

    result, calls = run_ci(repo, tmp_path, prepared)

    assert result.returncode == 1, result.stdout + result.stderr
    assert calls == ["(all)", "-e gate", "-e unit-coverage"]
    assert "\nfastdeploy_patch/calc.py (90.0%): Missing lines 10\n" in result.stdout
    assert "\ngate: PASS: patch coverage 90.0% meets the 80% threshold (HEAD against HEAD~1)\n" in result.stdout
    # coverage's own table: the file, then its missing line among the columns.
    assert "\nfastdeploy_patch/calc.py      12      1      2      1    86%   10\n" in result.stdout
    assert "\nCoverage failure: total of 86 is less than fail-under=100\n" in result.stdout
    assert summary(result.stdout) == [
        "ci: tests (tox: lint, workflow-lint, unit, distributed): passed (exit 0)",
        "ci: patch-coverage gate (tox -e gate): passed (exit 0)",
        "ci: unit coverage 100% (tox -e unit-coverage): FAILED (exit 1)",
        "ci: FAILED (exit 1)",
    ]


def test_a_fully_covered_change_passes_both_after_the_readmes_test_command(repo: Repo, tmp_path: Path) -> None:
    prepared = ci_repo(repo, tmp_path, FULLY_COVERED)

    result, calls = run_ci(repo, tmp_path, prepared)

    assert result.returncode == 0, result.stdout + result.stderr
    # CI's tests are the ones a user runs with the README's test command.
    assert calls == [readme_tox_call(), "-e gate", "-e unit-coverage"]
    assert "\ngate: PASS: patch coverage 100.0% meets the 80% threshold (HEAD against HEAD~1)\n" in result.stdout
    assert "\n2 files skipped due to complete coverage.\n" in result.stdout
    assert "Coverage failure" not in result.stdout
    assert summary(result.stdout) == ALL_PASSED


def test_a_docs_only_commit_passes_and_the_gate_says_there_is_nothing_to_gate(repo: Repo, tmp_path: Path) -> None:
    prepared = ci_repo(repo, tmp_path, FULLY_COVERED)
    repo.write("README.md", "# calc\n\nAdds numbers.\n")
    repo.commit("docs only")

    result, calls = run_ci(repo, tmp_path, prepared)

    assert result.returncode == 0, result.stdout + result.stderr
    assert calls == ["(all)", "-e gate", "-e unit-coverage"]
    assert "\nNo lines with coverage information in this diff.\n" in result.stdout
    assert "\ngate: PASS: nothing to gate, no coverable line changed (HEAD against HEAD~1)\n" in result.stdout
    assert summary(result.stdout) == ALL_PASSED


def test_a_failed_distributed_suite_skips_the_gate_and_still_judges_the_unit_coverage(
    repo: Repo, tmp_path: Path
) -> None:
    prepared = ci_repo(repo, tmp_path, FULLY_COVERED)

    result, calls = run_ci(repo, tmp_path, prepared, passing=("unit",), tox_exit=1)

    assert result.returncode == 1, result.stdout + result.stderr
    assert calls == ["(all)", "-e unit-coverage"]
    assert summary(result.stdout) == [
        "ci: tests (tox: lint, workflow-lint, unit, distributed): FAILED (exit 1)",
        "ci: patch-coverage gate (tox -e gate): not run: a test suite failed, so its coverage data is missing",
        "ci: unit coverage 100% (tox -e unit-coverage): passed (exit 0)",
        "ci: FAILED (exit 1)",
    ]


@pytest.mark.parametrize("tox_exit", [1, 5])
def test_failed_suites_fail_the_run_with_tox_exit_code_and_run_no_other_step(
    repo: Repo, tmp_path: Path, tox_exit: int
) -> None:
    prepared = ci_repo(repo, tmp_path, FULLY_COVERED)
    # Data an earlier run left must not pass for this run's.
    (repo.path / "coverage-data").mkdir()
    for suite in ("unit", "distributed"):
        shutil.copy(prepared / f"{suite}.coverage", repo.path / "coverage-data")

    result, calls = run_ci(repo, tmp_path, prepared, passing=(), tox_exit=tox_exit)

    assert result.returncode == tox_exit, result.stdout + result.stderr
    assert calls == ["(all)"]
    assert summary(result.stdout) == [
        f"ci: tests (tox: lint, workflow-lint, unit, distributed): FAILED (exit {tox_exit})",
        "ci: patch-coverage gate (tox -e gate): not run: a test suite failed, so its coverage data is missing",
        "ci: unit coverage 100% (tox -e unit-coverage): not run: the unit suite failed",
        f"ci: FAILED (exit {tox_exit})",
    ]


def test_a_failed_lint_with_passing_suites_fails_the_run_after_both_verdicts(repo: Repo, tmp_path: Path) -> None:
    prepared = ci_repo(repo, tmp_path, COVERED_AT_90)

    result, calls = run_ci(repo, tmp_path, prepared, tox_exit=1)

    assert result.returncode == 1, result.stdout + result.stderr
    assert calls == ["(all)", "-e gate", "-e unit-coverage"]
    assert summary(result.stdout) == [
        "ci: tests (tox: lint, workflow-lint, unit, distributed): FAILED (exit 1)",
        "ci: patch-coverage gate (tox -e gate): passed (exit 0)",
        "ci: unit coverage 100% (tox -e unit-coverage): FAILED (exit 1)",
        "ci: FAILED (exit 1)",
    ]


def test_passing_suites_whose_data_is_missing_still_reach_the_gate_which_says_so(repo: Repo, tmp_path: Path) -> None:
    prepared = ci_repo(repo, tmp_path, FULLY_COVERED)

    result, calls = run_ci(repo, tmp_path, prepared, passing=(), tox_exit=0)

    assert result.returncode == 2, result.stdout + result.stderr
    assert calls == ["(all)", "-e gate", "-e unit-coverage"]
    missing = "coverage data from the unit suite (coverage-data/unit.coverage) not found: run `tox -e unit`."
    assert f"gate: error: {missing}\n" in result.stderr
    assert f"unit-coverage: error: {missing}\n" in result.stderr
    assert summary(result.stdout)[-1] == "ci: FAILED (exit 2)"


def run_unit_coverage(repo: Repo, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(repo.path, str(UNIT_COVERAGE_PATH), *args)


def unit_data(repo: Repo, calls: str) -> None:
    copy_ci_files(repo)
    repo.write("fastdeploy_patch/__init__.py", "")
    repo.write("fastdeploy_patch/calc.py", CHANGED)
    repo.write("fastdeploy_patch/other.py", "def one():\n    return 1\n")
    repo.measure(calls, data_file="coverage-data/unit.coverage", xml=False, source="fastdeploy_patch")


def test_unit_coverage_lists_only_the_files_that_miss_something(repo: Repo) -> None:
    unit_data(repo, COVERED_AT_90 + "; import fastdeploy_patch.other as o; o.one()")

    result = run_unit_coverage(repo)

    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("fastdeploy_patch/")]
    assert rows == ["fastdeploy_patch/calc.py"]
    assert result.stdout.endswith("\nCoverage failure: total of 88 is less than fail-under=100\n")


def test_unit_coverage_counts_a_file_no_test_imported(repo: Repo) -> None:
    unit_data(repo, FULLY_COVERED)

    result = run_unit_coverage(repo)

    assert result.returncode == 1, result.stdout + result.stderr
    [row] = [line for line in result.stdout.splitlines() if line.startswith("fastdeploy_patch/other.py ")]
    assert row.split()[-1] == "1-2"


def test_unit_coverage_honours_a_lower_threshold(repo: Repo) -> None:
    unit_data(repo, COVERED_AT_90 + "; import fastdeploy_patch.other as o; o.one()")

    assert run_unit_coverage(repo, "--fail-under", "85").returncode == 0
    assert run_unit_coverage(repo, "--fail-under", "95").returncode == 1


def test_unit_coverage_without_data_names_the_env_to_run(repo: Repo) -> None:
    repo.write("fastdeploy_patch/__init__.py", "")

    result = run_unit_coverage(repo)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "unit-coverage: error: coverage data from the unit suite (coverage-data/unit.coverage) not found: "
        "run `tox -e unit`.\n"
    )


def test_unit_coverage_refuses_data_older_than_the_source(repo: Repo) -> None:
    unit_data(repo, FULLY_COVERED)
    data = repo.path / "coverage-data" / "unit.coverage"
    source = repo.path / "fastdeploy_patch" / "calc.py"
    os.utime(data, (source.stat().st_mtime - 60,) * 2)

    result = run_unit_coverage(repo)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "unit-coverage: error: coverage data from the unit suite (coverage-data/unit.coverage) is older than "
        "fastdeploy_patch/"
    )
    assert result.stderr.endswith(".py: run `tox -e unit`.\n")


def test_unit_coverage_rejects_a_bad_threshold(repo: Repo) -> None:
    result = run_unit_coverage(repo, "--fail-under", "101")

    assert result.returncode == 2
    assert "unit-coverage: error: argument --fail-under: must be between 0 and 100, got '101'" in result.stderr


def test_unit_coverage_refuses_data_coverage_cannot_read(repo: Repo) -> None:
    unit_data(repo, FULLY_COVERED)
    (repo.path / "coverage-data" / "unit.coverage").write_text("not a coverage data file", encoding="utf-8")

    result = run_unit_coverage(repo)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "unit-coverage: error: coverage data from the unit suite (coverage-data/unit.coverage) is unreadable ("
    )


def test_unit_coverage_reports_coverage_failing_on_its_own_as_an_error(repo: Repo) -> None:
    unit_data(repo, FULLY_COVERED)

    # No file under the source directory matches: coverage has nothing to report and exits 1, its error code.
    result = run_unit_coverage(repo, "--source-dir", "coverage-data")

    assert result.returncode == 2
    assert "No data to report." in result.stdout
    assert result.stderr == "unit-coverage: error: `coverage report` failed (exit 1); its output is above.\n"
