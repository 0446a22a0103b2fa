"""Patch-coverage gate: fail a change whose new lines are covered less than a threshold (80% by default).

Usage, from the repository root::

    python ci/gate.py [--suite-data NAME=DATA_FILE ...] [--source-dir fastdeploy_patch]
                      [--compare-ref REF] [--fail-under PCT] [--coverage-xml coverage.xml] [--report-dir ci-reports]

With ``--suite-data`` (``tox -e gate`` passes ``unit=coverage-data/unit.coverage`` and
``distributed=coverage-data/distributed.coverage``), the gate runs no test: it checks that each suite's coverage
data exists, is readable, measured some line and is not older than the newest file under ``--source-dir``
(modification times; ``__pycache__`` left out), combines the data into
``<report-dir>/combined.coverage`` and writes ``--coverage-xml`` from it. Without it, ``--coverage-xml`` must
already exist.

``--compare-ref`` falls back to the ``COMPARE_REF`` environment variable, then to ``origin/main``;
``--fail-under`` falls back to ``GATE_FAIL_UNDER``, then to 80.

diff-cover measures the lines that HEAD (plus staged and unstaged edits) adds relative to the merge base of the
compare ref, so commits the compare ref gained after the branch point never count. When HEAD is the only commit
of a full clone (so ``HEAD~1`` does not exist), every line is gated against git's empty tree. This script checks
what diff-cover cannot tell apart from a low score, runs it, and prints its JSON report per file. Reports:
``<report-dir>/patch-coverage.md`` (for a pull-request comment), ``patch-coverage.html`` and
``patch-coverage.json``.

Exit codes:
    0  patch coverage at or above the threshold, or no coverable changed lines (said so plainly);
    1  patch coverage below the threshold;
    2  usage or precondition error, one line starting ``gate: error:``: a suite's coverage data missing, older
       than the source, unreadable or empty (the line names the tox env to run); not a git repository; a compare
       ref that cannot be resolved (in a shallow clone: how to fetch the history); no merge base in a shallow
       clone; missing or unusable coverage.xml; diff-cover failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coverage import CoverageData
from coverage.exceptions import CoverageException

EXIT_PASS = 0
EXIT_BELOW_THRESHOLD = 1
EXIT_ERROR = 2

DEFAULT_COMPARE_REF = "origin/main"
DEFAULT_FAIL_UNDER = 80.0
REPORT_STEM = "patch-coverage"

# The same interpreter as the gate, so diff-cover comes from the environment the gate runs in.
DIFF_COVER_COMMAND: list[str] = [sys.executable, "-m", "diff_cover.diff_cover_tool"]
COVERAGE_COMMAND: list[str] = [sys.executable, "-m", "coverage"]
SUBPROCESS_TIMEOUT_S = 300


class GateError(Exception):
    """A precondition failed; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class FileCoverage:
    """Patch coverage of one changed file that coverage.xml measures."""

    path: str
    percent: float
    uncovered_lines: tuple[int, ...]


@dataclass(frozen=True)
class PatchCoverage:
    """diff-cover's verdict on a diff, as read back from its JSON report."""

    files: tuple[FileCoverage, ...]
    coverable_lines: int
    uncovered_lines: int
    percent: float
    changed_lines: int


def line_ranges(lines: Iterable[int]) -> str:
    """Return sorted line numbers with runs collapsed: ``[3, 7, 8, 9]`` gives ``"3, 7-9"``; no lines give ``""``."""
    parts: list[str] = []
    start = prev = None
    for line in sorted(set(lines)):
        if prev is not None and line == prev + 1:
            prev = line
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = line
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def format_percent(value: float) -> str:
    """Return ``value`` with one decimal, rounded down so that a score below a threshold never prints as equal."""
    return f"{math.floor(value * 10 + 1e-9) / 10:.1f}%"


def format_threshold(value: float) -> str:
    """Return the threshold without a trailing ``.0``: ``80%``, ``72.5%``."""
    return f"{value:g}%"


def _git(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )


def repo_root(cwd: Path) -> Path:
    """Return the top of the git work tree that contains ``cwd``; raise GateError outside one."""
    result = _git(["rev-parse", "--show-toplevel"], cwd)
    if result.returncode != 0:
        raise GateError(f"{cwd} is not inside a git work tree; run the gate from a clone of the repository.")
    return Path(result.stdout.strip())


@dataclass(frozen=True)
class CompareBase:
    """What diff-cover compares HEAD with: ``ref`` and the range notation, and the name the report shows."""

    ref: str
    notation: str
    name: str


def is_shallow(cwd: Path) -> bool:
    """True in a shallow clone, whose history stops before the root commit."""
    return _git(["rev-parse", "--is-shallow-repository"], cwd).stdout.strip() == "true"


def _fetch_history_hint() -> str:
    return (
        "this is a shallow clone: fetch the history first (`git fetch --deepen=<commits>`, or "
        "`git fetch --unshallow` for all of it; in GitHub Actions, `fetch-depth: 0` on actions/checkout)"
    )


def resolve_compare_base(ref: str, cwd: Path) -> CompareBase:
    """Return what to diff HEAD against for ``ref``; raise GateError when that would not measure the change.

    - ``ref`` shares history with HEAD: its merge base (``...``), so only the change's own lines count.
    - ``ref`` does not resolve in a full clone whose HEAD is the only commit: git's empty tree, so every line
      counts (there is no earlier commit to compare with).
    - In a shallow clone, a ``ref`` that does not resolve or has no merge base is an error that says how to fetch
      the history: comparing the two tips instead would count what ``ref`` changed after the branch point.
    - Unrelated histories in a full clone (no merge base exists at all): the two tips (``..``), with a warning.
    """
    shallow = is_shallow(cwd)
    if _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd).returncode != 0:
        if shallow:
            raise GateError(f"compare ref {ref!r} cannot be resolved: {_fetch_history_hint()}.")
        if _git(["rev-list", "--max-count=2", "HEAD"], cwd).stdout.split() == [_head(cwd)]:
            print(
                f"gate: note: compare ref {ref!r} does not exist and HEAD is the only commit: "
                "gating every line against the empty tree.",
                file=sys.stderr,
            )
            empty_tree = _git(["hash-object", "-t", "tree", os.devnull], cwd).stdout.strip()
            return CompareBase(empty_tree, "..", "the empty tree")
        hint = "fetch it first, e.g. `git fetch origin main` for origin/main"
        if ref.startswith("origin/"):
            hint = f"fetch it first: `git fetch origin {ref.removeprefix('origin/')}`"
        raise GateError(
            f"compare ref {ref!r} does not exist in this repository: {hint}; or set COMPARE_REF or pass --compare-ref."
        )
    if _git(["merge-base", ref, "HEAD"], cwd).returncode == 0:
        return CompareBase(ref, "...", ref)
    if shallow:
        raise GateError(f"{ref!r} and HEAD have no merge base in the fetched history: {_fetch_history_hint()}.")
    print(
        f"gate: warning: {ref!r} and HEAD have no common history (unrelated branches); comparing the two tips "
        f"({ref}..HEAD).",
        file=sys.stderr,
    )
    return CompareBase(ref, "..", ref)


def _head(cwd: Path) -> str:
    return _git(["rev-parse", "HEAD"], cwd).stdout.strip()


def last_source_change(source_dir: Path) -> tuple[float, Path | None]:
    """Return the newest modification time among the files under ``source_dir`` (bytecode caches left out) and
    that file; ``(0.0, None)`` when it holds no file."""
    newest: tuple[float, Path | None] = (0.0, None)
    for path in source_dir.rglob("*"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        mtime = path.stat().st_mtime
        if mtime > newest[0]:
            newest = (mtime, path)
    return newest


def _clock(mtime: float) -> str:
    return datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M:%S")


def check_suite_data(suites: Sequence[tuple[str, Path]], source_dir: Path, cwd: Path) -> None:
    """Raise GateError, naming the tox env to run again, when a suite's data file is missing, older than the newest
    file under ``source_dir`` (data measured before the last edit would judge code it never ran), unreadable, or
    measured no line."""
    if not source_dir.is_dir():
        raise GateError(f"source directory {_shown(source_dir, cwd)} not found: pass --source-dir.")
    changed_at, changed = last_source_change(source_dir)
    for name, data in suites:
        if not data.is_file():
            raise GateError(
                f"no coverage data from the {name} suite ({_shown(data, cwd)} not found): run `tox -e {name}` first."
            )
        written_at = data.stat().st_mtime
        if changed is not None and written_at < changed_at:
            raise GateError(
                f"coverage data from the {name} suite ({_shown(data, cwd)}, written {_clock(written_at)}) is older "
                f"than the last change to {_shown(source_dir, cwd)}/ ({_shown(changed, cwd)}, {_clock(changed_at)}): "
                f"run `tox -e {name}` first."
            )
        # `coverage combine` skips an unreadable file with a mere warning: the suite's lines would vanish.
        measured = CoverageData(basename=str(data))
        try:
            measured.read()
        except CoverageException as exc:
            raise GateError(
                f"coverage data from the {name} suite is unreadable ({exc}): run `tox -e {name}` again."
            ) from exc
        if not any(measured.lines(path) for path in measured.measured_files()):
            raise GateError(
                f"coverage data from the {name} suite ({_shown(data, cwd)}) measured no line: "
                f"run `tox -e {name}` again."
            )


def combine_suite_data(suites: Sequence[tuple[str, Path]], combined: Path, xml_path: Path, cwd: Path) -> None:
    """Combine the suites' data files (kept as they are) into ``combined`` and write ``xml_path`` from it."""
    steps = [
        ["combine", "--keep", "--quiet", f"--data-file={combined}", *(str(data) for _, data in suites)],
        ["xml", "--quiet", f"--data-file={combined}", "-o", str(xml_path)],
    ]
    for step in steps:
        result = subprocess.run(
            [*COVERAGE_COMMAND, *step], cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise GateError(f"`coverage {step[0]}` failed (exit {result.returncode}): {output}")


def check_coverage_xml(xml_path: Path, root: Path) -> None:
    """Raise GateError unless ``xml_path`` is a Cobertura report that measured lines under paths diff-cover can match.

    Each of these would otherwise let diff-cover score every diff as "no lines with coverage information" and pass.
    """
    if not xml_path.is_file():
        raise GateError(f"{xml_path} not found: run the tests under coverage, then `coverage xml -o {xml_path}`.")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as exc:
        raise GateError(f"{xml_path} is not a readable XML coverage report: {exc}") from exc
    if tree.find(".//class/lines/line") is None:
        raise GateError(
            f"{xml_path} measured no lines: coverage collection failed or measured the wrong source "
            "(check [tool.coverage.run] source), so any diff would pass unmeasured."
        )
    for source in tree.iterfind("./sources/source"):
        text = (source.text or "").strip()
        if text and Path(text).is_absolute() and not Path(text).resolve().is_relative_to(root.resolve()):
            raise GateError(
                f"{xml_path} has the absolute source path {text!r}, outside this checkout ({root}): "
                "diff-cover would match no file. Set `relative_files = true` in [tool.coverage.run] and rerun."
            )


def report_paths(report_dir: Path) -> dict[str, Path]:
    """Return where the gate writes each report format."""
    return {
        "json": report_dir / f"{REPORT_STEM}.json",
        "markdown": report_dir / f"{REPORT_STEM}.md",
        "html": report_dir / f"{REPORT_STEM}.html",
    }


def run_diff_cover(
    xml_path: Path, base: CompareBase, fail_under: float, reports: dict[str, Path], cwd: Path
) -> tuple[int, PatchCoverage]:
    """Run diff-cover, writing every report; return its exit code and its JSON report.

    Raise GateError when diff-cover fails without a verdict (no JSON report, or an exit code that contradicts it).
    """
    formats = ",".join(f"{kind}:{path}" for kind, path in reports.items())
    command = [
        *DIFF_COVER_COMMAND,
        str(xml_path),
        f"--compare-branch={base.ref}",
        f"--diff-range-notation={base.notation}",
        f"--fail-under={fail_under}",
        # Without it diff-cover truncates the total to an integer before comparing: 79.9 would read as 79.
        "--total-percent-float",
        f"--format={formats}",
        "--quiet",
    ]
    reports["json"].unlink(missing_ok=True)
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode not in (EXIT_PASS, EXIT_BELOW_THRESHOLD) or not reports["json"].is_file():
        raise GateError(f"diff-cover failed (exit {result.returncode}) without a report:\n{output}")
    coverage = read_report(reports["json"])
    # diff-cover scores a diff without coverable lines as 100%, so this also holds when there is nothing to gate.
    if (coverage.percent < fail_under) != (result.returncode == EXIT_BELOW_THRESHOLD):
        raise GateError(
            f"diff-cover exited {result.returncode} but its report says {coverage.percent}% "
            f"against a threshold of {fail_under}%:\n{output}"
        )
    return result.returncode, coverage


def read_report(json_path: Path) -> PatchCoverage:
    """Read diff-cover's JSON report into a PatchCoverage, files sorted by path."""
    data = json.loads(json_path.read_text(encoding="utf-8"))
    files = tuple(
        FileCoverage(
            path=path, percent=float(stats["percent_covered"]), uncovered_lines=tuple(stats["violation_lines"])
        )
        for path, stats in sorted(data["src_stats"].items())
    )
    return PatchCoverage(
        files=files,
        coverable_lines=int(data["total_num_lines"]),
        uncovered_lines=int(data["total_num_violations"]),
        percent=float(data["total_percent_covered"]),
        changed_lines=int(data["num_changed_lines"]),
    )


def verdict_line(coverage: PatchCoverage, fail_under: float, ref: str) -> str:
    """Return the one-line verdict that ends the console report and heads the Markdown report."""
    threshold = format_threshold(fail_under)
    if coverage.coverable_lines == 0:
        return (
            f"no coverable changed lines: nothing to gate ({coverage.changed_lines} changed lines against {ref}, "
            "none in files that coverage.xml measures)"
        )
    if coverage.percent < fail_under:
        return f"FAIL: patch coverage {format_percent(coverage.percent)} is below the {threshold} threshold"
    return f"PASS: patch coverage {format_percent(coverage.percent)} meets the {threshold} threshold"


def console_report(coverage: PatchCoverage, fail_under: float, base: CompareBase) -> str:
    """Return the per-file report: one line per measured changed file, then the total and the verdict."""
    diff = f"{base.ref}{base.notation}HEAD, plus staged and unstaged changes"
    lines = [f"Patch coverage of HEAD against {base.name} ({diff}):"]
    for changed in coverage.files:
        entry = f"  {changed.path}: {format_percent(changed.percent)}"
        if changed.uncovered_lines:
            entry += f" (uncovered lines: {line_ranges(changed.uncovered_lines)})"
        lines.append(entry)
    if coverage.coverable_lines:
        lines.append(
            f"TOTAL: {format_percent(coverage.percent)} of {coverage.coverable_lines} coverable changed lines "
            f"({coverage.uncovered_lines} uncovered; threshold {format_threshold(fail_under)})"
        )
    lines.append(verdict_line(coverage, fail_under, base.name))
    return "\n".join(lines)


def prepend_verdict(markdown_path: Path, verdict: str) -> None:
    """Put the verdict on top of diff-cover's Markdown report, where a pull-request comment shows it first."""
    body = markdown_path.read_text(encoding="utf-8")
    markdown_path.write_text(f"**Patch-coverage gate:** {verdict}\n\n{body}", encoding="utf-8")


def _shown(path: Path, cwd: Path) -> str:
    # Relative paths keep the report short and match what a user in the repository root would type.
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {text!r}")
    return value


def _suite_data(text: str) -> tuple[str, Path]:
    name, sep, data = text.partition("=")
    if not (sep and name and data):
        raise argparse.ArgumentTypeError(f"expected NAME=DATA_FILE, got {text!r}")
    return name, Path(data)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, taking defaults from COMPARE_REF and GATE_FAIL_UNDER; exit 2 on a bad value."""
    parser = argparse.ArgumentParser(
        # The name every message of the gate starts with, usage errors included.
        prog="gate",
        description="Fail when the lines a change adds are covered less than a threshold (diff-cover).",
        epilog="Exit codes: 0 pass or nothing to gate, 1 below the threshold, 2 usage or precondition error.",
    )
    parser.add_argument(
        "--compare-ref",
        default=os.environ.get("COMPARE_REF") or DEFAULT_COMPARE_REF,
        help="git ref to compare HEAD with (env COMPARE_REF; default %(default)s)",
    )
    parser.add_argument(
        "--fail-under",
        type=_threshold,
        default=os.environ.get("GATE_FAIL_UNDER") or str(DEFAULT_FAIL_UNDER),
        help="minimum patch coverage in percent (env GATE_FAIL_UNDER; default 80)",
    )
    parser.add_argument("--coverage-xml", type=Path, default=Path("coverage.xml"), help="default %(default)s")
    parser.add_argument("--report-dir", type=Path, default=Path("ci-reports"), help="default %(default)s")
    parser.add_argument(
        "--suite-data",
        type=_suite_data,
        action="append",
        default=[],
        metavar="NAME=DATA_FILE",
        help="coverage data file that `tox -e NAME` leaves; repeat per suite. The gate checks it is newer than "
        "--source-dir, combines them all and writes --coverage-xml from them",
    )
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=Path("fastdeploy_patch"),
        help="the measured source; --suite-data older than its newest file is stale (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, cwd: Path | None = None) -> int:
    """Run the gate in ``cwd`` (default: the current directory), print its report and return the exit code."""
    args = parse_args(argv)
    cwd = Path.cwd() if cwd is None else cwd
    xml_path = cwd / args.coverage_xml
    report_dir = cwd / args.report_dir
    suites = [(name, cwd / data) for name, data in args.suite_data]
    try:
        root = repo_root(cwd)
        base = resolve_compare_base(args.compare_ref, cwd)
        if suites:
            check_suite_data(suites, cwd / args.source_dir, cwd)
        try:
            report_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GateError(f"cannot create the report directory {report_dir}: {exc}") from exc
        if suites:
            combine_suite_data(suites, report_dir / "combined.coverage", xml_path, cwd)
        check_coverage_xml(xml_path, root)
        reports = report_paths(report_dir)
        exit_code, coverage = run_diff_cover(xml_path, base, args.fail_under, reports, cwd)
    except GateError as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(console_report(coverage, args.fail_under, base))
    prepend_verdict(reports["markdown"], verdict_line(coverage, args.fail_under, base.name))
    print("Reports: " + ", ".join(_shown(reports[kind], cwd) for kind in ("markdown", "html", "json")))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
