"""ci/gate.py end to end: real git repositories (a base commit and a change), real coverage data, real diff-cover.

diff-cover prints the report (one line per changed file it measures, then the totals); the gate adds the verdict
line, which these tests compare whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

from .scratch_repo import CHILD_TIMEOUT_S, GATE_PATH, GateRun, Repo, run_python

pytestmark = pytest.mark.timeout(120)

RunGate = Callable[..., GateRun]

BASE_CALC = """
    def add(a, b):
        return a + b
"""


def commit_base(repo: Repo, calc: str = BASE_CALC) -> None:
    repo.write("pkg/__init__.py", "")
    repo.write("pkg/calc.py", calc)
    repo.commit("base")


def quarter_covered_change(repo: Repo) -> None:
    """Base, then a change adding 4 coverable lines of which only the `def` line runs (25%)."""
    commit_base(repo)
    repo.write(
        "pkg/calc.py",
        """
        def add(a, b):
            return a + b


        def scale(x, factor):
            if factor == 0:
                raise ValueError("factor must not be 0")
            return x * factor
        """,
    )
    repo.commit("add scale, untested")
    repo.measure("import pkg.calc; pkg.calc.add(1, 2)")


def file_lines(out: str) -> list[str]:
    """diff-cover's lines for the changed files it measures, such as ``pkg/calc.py (25.0%): Missing lines 6-8``."""
    return [line for line in out.splitlines() if line.startswith("pkg/")]


def verdict(out: str) -> str:
    """The gate's own line: the last of its output, after diff-cover's report."""
    [line] = [line for line in out.splitlines() if line.startswith("gate: ")]
    assert out.endswith(f"{line}\n")
    return line


def test_change_covered_at_25_percent_fails_listing_the_file_and_its_uncovered_lines(
    repo: Repo, run_gate: RunGate
) -> None:
    quarter_covered_change(repo)

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 1
    assert "Diff: HEAD~1...HEAD, staged and unstaged changes" in run.out
    assert file_lines(run.out) == ["pkg/calc.py (25.0%): Missing lines 6-8"]
    assert "Total:   4 lines\nMissing: 3 lines\nCoverage: 25.0%\n" in run.out
    assert verdict(run.out) == "gate: FAIL: patch coverage 25.0% is below the 80% threshold (HEAD against HEAD~1)"
    # Outside GitHub Actions, diff-cover's Markdown report is left as diff-cover wrote it.
    markdown = (repo.path / "ci-reports" / "patch-coverage.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Diff Coverage\n")
    assert "pkg/calc&#46;py (25.0%): Missing lines 6-8" in markdown
    assert "pkg/calc.py" in (repo.path / "ci-reports" / "patch-coverage.html").read_text(encoding="utf-8")


def test_change_covered_at_exactly_80_percent_passes(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.write(
        "pkg/calc.py",
        """
        def add(a, b):
            return a + b


        def double(x):
            if x is None:
                return 0
            y = x * 2
            return y
        """,
    )
    repo.commit("add double")
    repo.measure("import pkg.calc; pkg.calc.double(3)")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 0
    assert file_lines(run.out) == ["pkg/calc.py (80.0%): Missing lines 7"]
    assert verdict(run.out) == "gate: PASS: patch coverage 80.0% meets the 80% threshold (HEAD against HEAD~1)"


def test_threshold_is_compared_as_a_float_not_a_truncated_integer(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.write(
        "pkg/calc.py",
        """
        def add(a, b):
            return a + b


        def double(x):
            if x is None:
                return 0
            y = x * 2
            z = y + 0
            return z
        """,
    )
    repo.commit("add double")
    repo.measure("import pkg.calc; pkg.calc.double(3)")

    # 5 of 6 lines: 83.33%. Truncated to 83 it would fail a threshold of 83.3.
    passing = run_gate(repo, "--compare-ref", "HEAD~1", "--fail-under", "83.3")
    failing = run_gate(repo, "--compare-ref", "HEAD~1", "--fail-under", "83.4")

    assert passing.code == 0
    assert verdict(passing.out) == (
        "gate: PASS: patch coverage 83.33% meets the 83.3% threshold (HEAD against HEAD~1)"
    )
    assert failing.code == 1
    assert verdict(failing.out) == (
        "gate: FAIL: patch coverage 83.33% is below the 83.4% threshold (HEAD against HEAD~1)"
    )


def test_renamed_file_counts_only_the_lines_the_change_added(repo: Repo, run_gate: RunGate) -> None:
    repo.write("pkg/__init__.py", "")
    repo.write(
        "pkg/legacy.py",
        """
        def parse(text):
            if not text:
                return []
            parts = text.split(",")
            cleaned = [part.strip() for part in parts]
            return [part for part in cleaned if part]
        """,
    )
    repo.commit("base")
    repo.git("mv", "pkg/legacy.py", "pkg/modern.py")
    with (repo.path / "pkg" / "modern.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef count(text):\n    return len(parse(text))\n")
    repo.commit("rename legacy to modern, add count")
    # Lines 4-6, carried over by the rename, stay uncovered; they are not part of the change.
    repo.measure("import pkg.modern; pkg.modern.count('')")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 0
    assert file_lines(run.out) == ["pkg/modern.py (100%)"]
    assert "Total:   2 lines\nMissing: 0 lines\n" in run.out


def test_pure_rename_has_no_coverable_changed_lines(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.git("mv", "pkg/calc.py", "pkg/arith.py")
    repo.commit("rename calc to arith")
    repo.measure("import pkg.arith")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 0
    assert file_lines(run.out) == []
    assert verdict(run.out) == "gate: PASS: nothing to gate, no coverable line changed (HEAD against HEAD~1)"


def test_deleted_lines_are_not_counted(repo: Repo, run_gate: RunGate) -> None:
    commit_base(
        repo,
        """
        def add(a, b):
            if a is None:
                raise TypeError("a is None")
            if b is None:
                raise TypeError("b is None")
            return a + b
        """,
    )
    repo.write("pkg/calc.py", "def add(a, b):\n    return a + b + 0\n")
    repo.commit("drop the None checks")
    repo.measure("import pkg.calc; pkg.calc.add(1, 2)")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 0
    assert file_lines(run.out) == ["pkg/calc.py (100%)"]
    assert "Total:   1 line\nMissing: 0 lines\n" in run.out


def test_change_that_only_deletes_lines_has_nothing_to_gate(repo: Repo, run_gate: RunGate) -> None:
    commit_base(
        repo,
        """
        def add(a, b):
            if a is None:
                raise TypeError("a is None")
            return a + b
        """,
    )
    repo.write("pkg/calc.py", "def add(a, b):\n    return a + b\n")
    repo.commit("drop the None check")
    repo.measure("import pkg.calc")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 0
    assert verdict(run.out) == "gate: PASS: nothing to gate, no coverable line changed (HEAD against HEAD~1)"


def test_non_python_and_unmeasured_files_do_not_dilute_the_score(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.write("README.md", "# calc\n\nAdds numbers.\n")
    repo.write("pkg/schema.json", '{"type": "object"}\n')
    repo.write("scripts/tool.py", "def unused():\n    return 1\n")
    with (repo.path / "pkg" / "calc.py").open("a", encoding="utf-8") as module:
        module.write("\n\nZERO = 0\n")
    repo.commit("docs, data, a script and one covered line")
    repo.measure("import pkg.calc")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 0
    assert file_lines(run.out) == ["pkg/calc.py (100%)"]
    assert "Total:   1 line\nMissing: 0 lines\n" in run.out


def test_docs_only_change_says_there_is_nothing_to_gate(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.write("README.md", "# calc\n\nAdds numbers.\n")
    repo.commit("docs only")
    repo.measure("import pkg.calc")

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--fail-under", "100")

    assert run.code == 0
    assert "No lines with coverage information in this diff." in run.out
    assert verdict(run.out) == "gate: PASS: nothing to gate, no coverable line changed (HEAD against HEAD~1)"


def test_compare_ref_equal_to_head_says_there_is_nothing_to_gate(repo: Repo, run_gate: RunGate) -> None:
    quarter_covered_change(repo)

    run = run_gate(repo, "--compare-ref", "HEAD")

    assert run.code == 0
    assert verdict(run.out) == "gate: PASS: nothing to gate, no coverable line changed (HEAD against HEAD)"


def test_unstaged_edits_count_as_part_of_the_change(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.write("README.md", "docs\n")
    repo.commit("docs only")
    with (repo.path / "pkg" / "calc.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef neg(x):\n    return -x\n")
    repo.measure("import pkg.calc")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 1
    assert file_lines(run.out) == ["pkg/calc.py (50.0%): Missing lines 6"]


def test_missing_compare_ref_is_a_clear_error(repo: Repo, run_gate: RunGate) -> None:
    quarter_covered_change(repo)

    run = run_gate(repo, "--compare-ref", "origin/feature")

    assert run.code == 2
    assert run.out == ""
    assert run.err == (
        "gate: error: compare ref 'origin/feature' does not exist in this repository: fetch it first "
        "(`git fetch origin feature`), or set COMPARE_REF or pass --compare-ref.\n"
    )
    assert not (repo.path / "ci-reports").exists()


def test_default_compare_ref_is_origin_main(repo: Repo, run_gate: RunGate) -> None:
    quarter_covered_change(repo)

    run = run_gate(repo)

    assert run.code == 2
    assert "compare ref 'origin/main' does not exist" in run.err
    assert "`git fetch origin main`" in run.err


def test_single_commit_repository_gates_every_line_against_the_empty_tree(repo: Repo, run_gate: RunGate) -> None:
    commit_base(
        repo,
        """
        def add(a, b):
            return a + b


        def neg(x):
            return -x
        """,
    )
    repo.measure("import pkg.calc; pkg.calc.add(1, 2)")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    empty_tree = repo.git("hash-object", "-t", "tree", "/dev/null").strip()
    assert run.err == (
        "gate: note: compare ref 'HEAD~1' does not exist and HEAD is the only commit.\n"
        "Failure. Coverage is below 80%.\n"  # diff-cover's
    )
    assert f"Diff: {empty_tree}..HEAD, staged and unstaged changes" in run.out
    assert run.code == 1
    assert file_lines(run.out) == ["pkg/calc.py (75.0%): Missing lines 6"]
    assert verdict(run.out) == (
        "gate: FAIL: patch coverage 75.0% is below the 80% threshold (HEAD against the empty tree)"
    )


def test_missing_previous_commit_in_a_longer_full_history_is_a_clear_error(repo: Repo, run_gate: RunGate) -> None:
    # HEAD~3 does not exist, but HEAD has a parent: not the single-commit case, so no fallback to the empty tree.
    quarter_covered_change(repo)

    run = run_gate(repo, "--compare-ref", "HEAD~3")

    assert run.code == 2
    assert run.err == (
        "gate: error: compare ref 'HEAD~3' does not exist in this repository: fetch it first, or set COMPARE_REF or "
        "pass --compare-ref.\n"
    )


def shallow_clone(repo: Repo, target: Repo, *args: str) -> None:
    subprocess.run(
        ["git", "clone", "--quiet", "--depth=1", *args, f"file://{repo.path}", str(target.path)],
        check=True,
        timeout=CHILD_TIMEOUT_S,
    )


def test_shallow_clone_without_the_compare_ref_says_how_to_fetch_history(
    repo: Repo, run_gate: RunGate, tmp_path
) -> None:
    quarter_covered_change(repo)
    clone = Repo(tmp_path / "shallow")
    shallow_clone(repo, clone)
    repo.measure("import pkg.calc; pkg.calc.add(1, 2)")
    shutil.copy(repo.path / "coverage.xml", clone.path / "coverage.xml")

    run = run_gate(clone, "--compare-ref", "HEAD~1")

    # Not treated as a single-commit repository: its HEAD has a parent that was not fetched.
    assert run.code == 2
    assert run.out == ""
    assert run.err.startswith("gate: error: compare ref 'HEAD~1' cannot be resolved: this is a shallow clone")
    assert "`git fetch --deepen=<commits>`" in run.err
    assert "`fetch-depth: 0` on actions/checkout" in run.err
    assert len(run.err.splitlines()) == 1


def test_shallow_clone_without_a_merge_base_says_how_to_fetch_history(repo: Repo, run_gate: RunGate, tmp_path) -> None:
    commit_base(repo)
    repo.git("switch", "--quiet", "--create", "feature")
    with (repo.path / "pkg" / "calc.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef neg(x):\n    return -x\n")
    repo.commit("feature")
    repo.git("switch", "--quiet", "main")
    repo.write("README.md", "main moved on\n")
    repo.commit("main moves on")
    clone = Repo(tmp_path / "shallow")
    shallow_clone(repo, clone, "--branch=feature")
    clone.git("fetch", "--quiet", "--depth=1", "origin", "main:refs/remotes/origin/main")
    clone.measure("import pkg.calc")

    run = run_gate(clone, "--compare-ref", "origin/main")

    # Comparing the tips instead would also count what main changed after the branch point.
    assert run.code == 2
    assert "gate: error: 'origin/main' and HEAD have no merge base in the fetched history" in run.err
    assert "`git fetch --deepen=<commits>`" in run.err


def test_compare_ref_that_moved_on_counts_only_the_branchs_own_lines(repo: Repo, run_gate: RunGate) -> None:
    commit_base(
        repo,
        """
        def add(a, b):
            return a + b


        def legacy(x):
            if x:
                return 1
            return 0
        """,
    )
    repo.git("switch", "--quiet", "--create", "feature")
    with (repo.path / "pkg" / "calc.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef neg(x):\n    return -x\n")
    repo.commit("feature: neg, tested")
    repo.git("switch", "--quiet", "main")
    # After the branch point, main drops `legacy` and adds an untested function: neither is the branch's change.
    repo.write(
        "pkg/calc.py",
        """
        def add(a, b):
            return a + b


        def untested(y):
            return y * 3
        """,
    )
    repo.commit("main moves on")
    repo.git("switch", "--quiet", "feature")
    repo.measure("import pkg.calc; pkg.calc.neg(1)")

    run = run_gate(repo, "--compare-ref", "main")

    # Against main's tip (main..HEAD), feature's `legacy` (lines 6-9, 3 never run) would count as added: 50%.
    assert "Diff: main...HEAD, staged and unstaged changes" in run.out
    assert run.code == 0
    assert file_lines(run.out) == ["pkg/calc.py (100%)"]
    assert "Total:   2 lines\nMissing: 0 lines\n" in run.out


def test_compare_ref_and_threshold_come_from_the_environment(
    repo: Repo, run_gate: RunGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    quarter_covered_change(repo)
    monkeypatch.setenv("COMPARE_REF", "HEAD~1")
    monkeypatch.setenv("GATE_FAIL_UNDER", "20")

    from_env = run_gate(repo)
    monkeypatch.setenv("COMPARE_REF", "no-such-ref")
    from_args = run_gate(repo, "--compare-ref", "HEAD~1", "--fail-under", "30")

    assert from_env.code == 0
    assert verdict(from_env.out) == "gate: PASS: patch coverage 25.0% meets the 20% threshold (HEAD against HEAD~1)"
    assert from_args.code == 1
    assert verdict(from_args.out) == (
        "gate: FAIL: patch coverage 25.0% is below the 30% threshold (HEAD against HEAD~1)"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("eighty", "not a number: 'eighty'"),
        ("101", "must be between 0 and 100, got '101'"),
        ("-1", "must be between 0 and 100, got '-1'"),
    ],
)
def test_bad_threshold_is_a_usage_error(
    gate: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    monkeypatch.setenv("GATE_FAIL_UNDER", value)

    with pytest.raises(SystemExit) as exited:
        gate.parse_args([])

    assert exited.value.code == 2
    assert f"gate: error: argument --fail-under: {message}" in capsys.readouterr().err


def test_threshold_bounds_are_accepted(gate: ModuleType) -> None:
    assert gate.parse_args(["--fail-under", "0"]).fail_under == 0.0
    assert gate.parse_args(["--fail-under", "100"]).fail_under == 100.0
    assert gate.parse_args([]).fail_under == 80.0


def test_outside_a_git_repository_is_a_clear_error(tmp_path, run_gate: RunGate) -> None:
    plain = Repo(tmp_path / "plain")
    plain.path.mkdir()

    run = run_gate(plain, "--compare-ref", "HEAD~1")

    assert run.code == 2
    assert f"gate: error: {plain.path} is not inside a git work tree" in run.err


def test_missing_coverage_xml_is_a_clear_error(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.write("README.md", "docs\n")
    repo.commit("docs")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 2
    assert run.err == "gate: error: coverage.xml not found: pass --suite-data, or run `coverage xml` first.\n"


def test_unreadable_coverage_xml_is_a_clear_error(repo: Repo, run_gate: RunGate) -> None:
    quarter_covered_change(repo)
    (repo.path / "coverage.xml").write_text("<coverage", encoding="utf-8")

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    # diff-cover exits 1 on it, as for a low score, after its traceback.
    assert run.code == 2
    assert "ParseError" in run.err
    assert run.err.endswith("gate: error: diff-cover failed (exit 1) without a verdict; its output is above.\n")


def test_unrelated_histories_in_a_full_clone_warn_and_compare_the_tips(repo: Repo, run_gate: RunGate) -> None:
    commit_base(repo)
    repo.git("switch", "--quiet", "--orphan", "unrelated")
    repo.write("NOTES.txt", "another history\n")
    repo.commit("unrelated root")
    repo.git("switch", "--quiet", "main")
    repo.measure("import pkg.calc; pkg.calc.add(1, 2)")

    run = run_gate(repo, "--compare-ref", "unrelated")

    assert run.err == "gate: warning: 'unrelated' and HEAD have no common history; comparing the two tips.\n"
    assert "Diff: unrelated..HEAD, staged and unstaged changes" in run.out
    assert run.code == 0
    assert file_lines(run.out) == ["pkg/calc.py (100%)"]


def test_report_directory_that_cannot_be_created_is_an_error(repo: Repo, run_gate: RunGate) -> None:
    quarter_covered_change(repo)

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--report-dir", ".gitignore/reports")

    assert run.code == 2
    assert run.err == f"gate: error: [Errno 20] Not a directory: '{repo.path / '.gitignore' / 'reports'}'\n"


@pytest.mark.parametrize(
    ("writes_report", "exit_code"),
    [(False, 1), (True, 3)],
    ids=["exit-1-without-a-report", "exit-3-with-a-report"],
)
def test_diff_cover_failure_is_an_error_not_a_low_score(
    repo: Repo,
    run_gate: RunGate,
    gate: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    writes_report: bool,
    exit_code: int,
) -> None:
    quarter_covered_change(repo)
    assert run_gate(repo, "--compare-ref", "HEAD~1").code == 1  # leaves a JSON report that must not be reused
    report = '{"total_num_lines": 4, "total_percent_covered": 100.0}'
    fake = (
        "import sys\n"
        "spec = next(a for a in sys.argv if a.startswith('--format=')).removeprefix('--format=')\n"
        "paths = dict(item.split(':', 1) for item in spec.split(','))\n"
        f"if {writes_report}: open(paths['json'], 'w').write({report!r})\n"
        f"sys.exit({exit_code})\n"
    )
    monkeypatch.setattr(gate, "DIFF_COVER_COMMAND", [sys.executable, "-c", fake])

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 2
    assert run.out == ""
    assert run.err == f"gate: error: diff-cover failed (exit {exit_code}) without a verdict; its output is above.\n"


def test_command_line_prints_diff_cover_report_then_its_failure_line_then_the_verdict(repo: Repo) -> None:
    quarter_covered_change(repo)

    # One stream, as a CI log gets it: nothing is printed out of order by buffering.
    result = subprocess.run(
        [sys.executable, str(GATE_PATH), "--compare-ref", "HEAD~1"],
        cwd=repo.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 1, result.stdout
    assert result.stdout.endswith(
        "pkg/calc.py (25.0%): Missing lines 6-8\n"
        "-------------\n"
        "Total:   4 lines\n"
        "Missing: 3 lines\n"
        "Coverage: 25.0%\n"
        "-------------\n"
        "\n"
        "Failure. Coverage is below 80%.\n"
        "gate: FAIL: patch coverage 25.0% is below the 80% threshold (HEAD against HEAD~1)\n"
    )


SUITES = ("--suite-data", "unit=cov/unit.coverage", "--suite-data", "distributed=cov/distributed.coverage")
SUITE_FILES = ("cov/unit.coverage", "cov/distributed.coverage")


def two_function_change(repo: Repo) -> None:
    """Base, then a change adding `neg` and `double` (2 coverable lines each), each run by one suite only."""
    # As in the project: coverage's CLI, which combines the suites' data, keeps their relative paths only with it.
    repo.write("pyproject.toml", "[tool.coverage.run]\nrelative_files = true\n")
    commit_base(repo)
    with (repo.path / "pkg" / "calc.py").open("a", encoding="utf-8") as module:
        module.write("\n\ndef neg(x):\n    return -x\n\n\ndef double(x):\n    return 2 * x\n")
    repo.commit("neg and double")
    repo.measure("import pkg.calc; pkg.calc.neg(1)", data_file="cov/unit.coverage", xml=False)
    repo.measure("import pkg.calc; pkg.calc.double(1)", data_file="cov/distributed.coverage", xml=False)


def test_suite_data_is_combined_into_coverage_xml_and_kept(repo: Repo, run_gate: RunGate) -> None:
    two_function_change(repo)

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    # Either suite alone covers half of the change; only their union reaches 100%.
    assert run.code == 0, run.err
    assert file_lines(run.out) == ["pkg/calc.py (100%)"]
    assert "Total:   4 lines\nMissing: 0 lines\n" in run.out
    assert (repo.path / "cov" / "unit.coverage").is_file()
    assert (repo.path / "cov" / "distributed.coverage").is_file()
    assert (repo.path / "ci-reports" / "combined.coverage").is_file()
    assert "pkg/calc.py" in (repo.path / "coverage.xml").read_text(encoding="utf-8")


def test_combined_data_replaces_an_earlier_coverage_xml(repo: Repo, run_gate: RunGate) -> None:
    two_function_change(repo)
    repo.measure("import pkg.calc")  # a stale coverage.xml in which neither function ran

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 0
    assert file_lines(run.out) == ["pkg/calc.py (100%)"]


@pytest.mark.parametrize("suite", ["unit", "distributed"])
def test_missing_suite_data_names_the_command_to_run_first(repo: Repo, run_gate: RunGate, suite: str) -> None:
    two_function_change(repo)
    (repo.path / "cov" / f"{suite}.coverage").unlink()

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 2
    assert run.out == ""
    assert run.err == (
        f"gate: error: coverage data from the {suite} suite (cov/{suite}.coverage) not found: run `tox -e {suite}`.\n"
    )
    assert not (repo.path / "coverage.xml").exists()


@pytest.mark.parametrize("suite", ["unit", "distributed"])
def test_suite_data_older_than_the_source_names_the_command_to_run_first(
    repo: Repo, run_gate: RunGate, suite: str
) -> None:
    two_function_change(repo)
    data = repo.path / "cov" / f"{suite}.coverage"
    written = data.stat().st_mtime
    os.utime(data, (written - 60, written - 60))
    # Bytecode caches are not a change to the source.
    (repo.path / "pkg" / "__pycache__").mkdir(exist_ok=True)
    (repo.path / "pkg" / "__pycache__" / "calc.cpython.pyc").write_bytes(b"")

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 2
    assert run.err == (
        f"gate: error: coverage data from the {suite} suite (cov/{suite}.coverage) is older than pkg/calc.py: "
        f"run `tox -e {suite}`.\n"
    )


def test_suite_data_written_after_the_last_source_change_is_fresh(repo: Repo, run_gate: RunGate) -> None:
    two_function_change(repo)
    newest = max(path.stat().st_mtime for path in (repo.path / "pkg").rglob("*.py"))
    for suite in ("unit", "distributed"):
        os.utime(repo.path / "cov" / f"{suite}.coverage", (newest, newest))

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 0, run.err


@pytest.mark.parametrize("contents", ["missing", "empty", "only bytecode"])
def test_source_directory_without_a_file_is_an_error(repo: Repo, run_gate: RunGate, contents: str) -> None:
    two_function_change(repo)
    if contents != "missing":
        (repo.path / "src" / "__pycache__").mkdir(parents=True)
    if contents == "only bytecode":
        (repo.path / "src" / "__pycache__" / "calc.cpython.pyc").write_bytes(b"")

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "src", *SUITES)

    assert run.code == 2
    assert run.err == "gate: error: no file under the source directory src: pass --source-dir.\n"


def test_unreadable_suite_data_is_an_error_though_coverage_combine_only_warns(repo: Repo, run_gate: RunGate) -> None:
    two_function_change(repo)
    (repo.path / "cov" / "unit.coverage").write_text("not a coverage data file", encoding="utf-8")
    combine = run_python(repo.path, "-m", "coverage", "combine", "--keep", "--data-file=combined", *SUITE_FILES)
    assert combine.returncode == 0
    assert combine.stderr.endswith("Combined 1 file, 1 file errored\n")

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 2
    assert run.err.startswith(
        "gate: error: coverage data from the unit suite (cov/unit.coverage) is unreadable (Couldn't use data file "
        f"'{repo.path}/cov/unit.coverage'"
    )
    assert run.err.endswith("run `tox -e unit`.\n")


@pytest.mark.parametrize(("suite", "data"), [("distributed", "a run that measured nothing"), ("unit", "0 bytes")])
def test_suite_data_that_measured_no_line_is_an_error(repo: Repo, run_gate: RunGate, suite: str, data: str) -> None:
    two_function_change(repo)
    if data == "0 bytes":
        (repo.path / "cov" / f"{suite}.coverage").write_bytes(b"")
    else:
        repo.measure("pass", data_file=f"cov/{suite}.coverage", xml=False)

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 2
    assert run.err == (
        f"gate: error: coverage data from the {suite} suite (cov/{suite}.coverage) measured no line: "
        f"run `tox -e {suite}`.\n"
    )


def test_failed_coverage_command_is_an_error(
    repo: Repo, run_gate: RunGate, gate: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_function_change(repo)
    monkeypatch.setattr(gate, "COVERAGE_COMMAND", [sys.executable, "-c", "import sys; sys.exit('no combine')"])

    run = run_gate(repo, "--compare-ref", "HEAD~1", "--source-dir", "pkg", *SUITES)

    assert run.code == 2
    assert run.err == "gate: error: `coverage combine` failed (exit 1): no combine\n"


def test_usage_errors_are_printed_as_gate_error(repo: Repo) -> None:
    result = run_python(repo.path, str(GATE_PATH), "--suite-data", "unit")

    assert result.returncode == 2
    assert result.stderr.startswith("usage: gate ")
    assert result.stderr.endswith("gate: error: argument --suite-data: expected NAME=DATA_FILE, got 'unit'\n")


def test_under_github_actions_the_verdict_and_markdown_report_are_appended_to_the_job_summary(
    repo: Repo, run_gate: RunGate, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    quarter_covered_change(repo)
    summary = tmp_path / "step_summary.md"
    summary.write_text("an earlier step's summary\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    run = run_gate(repo, "--compare-ref", "HEAD~1")

    assert run.code == 1
    markdown = (repo.path / "ci-reports" / "patch-coverage.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Diff Coverage\n")
    assert summary.read_text(encoding="utf-8") == (
        "an earlier step's summary\n"
        "**Patch-coverage gate:** FAIL: patch coverage 25.0% is below the 80% threshold (HEAD against HEAD~1)\n\n"
        f"{markdown.rstrip()}\n\n"
    )
    assert verdict(run.out) == "gate: FAIL: patch coverage 25.0% is below the 80% threshold (HEAD against HEAD~1)"


def test_under_github_actions_an_error_is_appended_to_the_job_summary(
    repo: Repo, run_gate: RunGate, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    quarter_covered_change(repo)
    summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    run = run_gate(repo, "--compare-ref", "origin/feature")

    assert run.code == 2
    assert summary.read_text(encoding="utf-8") == (
        "**Patch-coverage gate:** error: compare ref 'origin/feature' does not exist in this repository: fetch it "
        "first (`git fetch origin feature`), or set COMPARE_REF or pass --compare-ref.\n\n"
    )
