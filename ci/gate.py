"""Patch-coverage gate: diff-cover fails a change whose added lines are covered less than a threshold (80% by default).

Usage, from the repository root (``--help`` lists the defaults and the environment variables)::

    python ci/gate.py [--suite-data NAME=DATA_FILE ...] [--source-dir fastdeploy_patch]
                      [--compare-ref REF] [--fail-under PCT] [--coverage-xml coverage.xml] [--report-dir ci-reports]

It runs no test. With ``--suite-data``, it checks each suite's data file (suite_data.py), combines them and writes
``--coverage-xml``. Then diff-cover prints its report of the lines HEAD (plus staged and unstaged edits) adds since its
merge base with the compare ref, writes it as Markdown, HTML and JSON in ``--report-dir``, and judges it. The gate
adds one verdict line, which under GitHub Actions heads diff-cover's Markdown report in the job summary. It checks
itself what diff-cover would take for a pass or a low score: the suites' data, a compare ref that does not resolve or
has no merge base (diff-cover exits 1), a diff with no coverable line.

Exit codes:
    0  patch coverage at or above the threshold, or no coverable changed lines (said so plainly);
    1  patch coverage below the threshold;
    2  usage or precondition error, one line starting ``gate: error:``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# ci/ is a folder of scripts: `python ci/gate.py` puts ci/ on sys.path.
from suite_data import COVERAGE_COMMAND, EXIT_ERROR, TIMEOUT_S, CheckError, check_suite_data, shown, threshold

DIFF_COVER_COMMAND: list[str] = [sys.executable, "-m", "diff_cover.diff_cover_tool"]


def _git(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def _compare(ref: str, notation: str) -> list[str]:
    return [f"--compare-branch={ref}", f"--diff-range-notation={notation}"]


def compare_options(ref: str, cwd: Path) -> tuple[list[str], str]:
    """Return diff-cover's options that diff HEAD against ``ref``, and what the verdict calls it: ``ref``'s merge base
    with HEAD; git's empty tree when ``ref`` does not resolve and HEAD is the only commit; the two tips (with a
    warning) for unrelated histories in a full clone. Raise CheckError when ``ref`` does not resolve, or in a shallow
    clone has no merge base: comparing the two tips there would count what ``ref`` changed after the branch point."""
    shallow = _git(["rev-parse", "--is-shallow-repository"], cwd)
    if shallow.returncode != 0:
        raise CheckError(f"{cwd} is not inside a git work tree; run the gate from a clone of the repository.")
    fetch_hint = (
        "this is a shallow clone: fetch the history first (`git fetch --deepen=<commits>`, or "
        "`git fetch --unshallow` for all of it; in GitHub Actions, `fetch-depth: 0` on actions/checkout)"
    )
    is_shallow = shallow.stdout.strip() == "true"
    if _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd).returncode != 0:
        if is_shallow:
            raise CheckError(f"compare ref {ref!r} cannot be resolved: {fetch_hint}.")
        if len(_git(["rev-list", "--max-count=2", "HEAD"], cwd).stdout.split()) == 1:
            print(f"gate: note: compare ref {ref!r} does not exist and HEAD is the only commit.", file=sys.stderr)
            empty_tree = _git(["hash-object", "-t", "tree", os.devnull], cwd).stdout.strip()
            return _compare(empty_tree, ".."), "the empty tree"
        fetch = f" (`git fetch origin {ref.removeprefix('origin/')}`)" if ref.startswith("origin/") else ""
        raise CheckError(
            f"compare ref {ref!r} does not exist in this repository: fetch it first{fetch}, or set COMPARE_REF or "
            "pass --compare-ref."
        )
    if _git(["merge-base", ref, "HEAD"], cwd).returncode == 0:
        return _compare(ref, "..."), ref
    if is_shallow:
        raise CheckError(f"{ref!r} and HEAD have no merge base in the fetched history: {fetch_hint}.")
    print(f"gate: warning: {ref!r} and HEAD have no common history; comparing the two tips.", file=sys.stderr)
    return _compare(ref, ".."), ref


def write_coverage_xml(suites: Sequence[tuple[str, Path]], combined: Path, xml_path: Path, cwd: Path) -> None:
    """Combine the suites' data files (kept as they are) into ``combined`` and write ``xml_path`` from it."""
    data_files = [str(data) for _, data in suites]
    for step in (["combine", "--keep", *data_files], ["xml", "-o", str(xml_path)]):
        command = [*COVERAGE_COMMAND, step[0], "--quiet", f"--data-file={combined}", *step[1:]]
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise CheckError(f"`coverage {step[0]}` failed (exit {result.returncode}): {output}")


def run_diff_cover(
    xml_path: Path, compare: list[str], compared_with: str, fail_under: float, report_dir: Path, cwd: Path
) -> int:
    """Run diff-cover, which prints its report and writes it in ``report_dir``; print the verdict line and return
    diff-cover's exit code. Raise CheckError when diff-cover stopped without a verdict (its exit code is then 1, the
    same as for a low score)."""
    markdown, html, report = (report_dir / f"patch-coverage.{suffix}" for suffix in ("md", "html", "json"))
    report.unlink(missing_ok=True)
    # Without --total-percent-float, diff-cover truncates the total to an integer before comparing: 79.9 would be 79.
    command = [*DIFF_COVER_COMMAND, str(xml_path), *compare, f"--fail-under={fail_under}", "--total-percent-float"]
    command.append(f"--format=markdown:{markdown},html:{html},json:{report}")
    # diff-cover's exit codes are the gate's: 0 at or above --fail-under, 1 below it, but also 1 on an error.
    # Unbuffered: in a log, as on a terminal, its report then comes before its "Failure." line on stderr.
    code = subprocess.run(command, cwd=cwd, timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code not in (0, 1) or not report.is_file():
        raise CheckError(f"diff-cover failed (exit {code}) without a verdict; its output is above.")
    totals = json.loads(report.read_text(encoding="utf-8"))
    score = f"patch coverage {totals['total_percent_covered']}%"
    if not totals["total_num_lines"]:
        verdict = "PASS: nothing to gate, no coverable line changed"
    elif code == 0:
        verdict = f"PASS: {score} meets the {fail_under:g}% threshold"
    else:
        verdict = f"FAIL: {score} is below the {fail_under:g}% threshold"
    verdict += f" (HEAD against {compared_with})"
    print(f"gate: {verdict}")
    append_to_job_summary(f"**Patch-coverage gate:** {verdict}\n\n{markdown.read_text(encoding='utf-8')}")
    return code


def append_to_job_summary(markdown: str) -> None:
    """Append ``markdown`` to the GitHub Actions job summary, when the job has one (elsewhere, do nothing)."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as out:
            out.write(f"{markdown.rstrip()}\n\n")


def _suite_data(text: str) -> tuple[str, Path]:
    name, sep, data = text.partition("=")
    if not (sep and name and data):
        raise argparse.ArgumentTypeError(f"expected NAME=DATA_FILE, got {text!r}")
    return name, Path(data)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, taking defaults from COMPARE_REF and GATE_FAIL_UNDER; exit 2 on a bad value."""
    parser = argparse.ArgumentParser(
        prog="gate",
        description="Fail when the lines a change adds are covered less than a threshold (diff-cover). COMPARE_REF "
        "and GATE_FAIL_UNDER in the environment set the defaults; --suite-data is given once per test suite.",
        epilog="Exit codes: 0 pass or nothing to gate, 1 below the threshold, 2 usage or precondition error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    env = os.environ
    parser.add_argument("--compare-ref", default=env.get("COMPARE_REF") or "origin/main", help="git ref")
    parser.add_argument("--fail-under", type=threshold, default=env.get("GATE_FAIL_UNDER") or "80", help="percent")
    parser.add_argument("--coverage-xml", type=Path, default=Path("coverage.xml"), help="written from --suite-data")
    parser.add_argument("--report-dir", type=Path, default=Path("ci-reports"), help="diff-cover's reports go here")
    parser.add_argument("--suite-data", type=_suite_data, action="append", default=[], metavar="NAME=DATA_FILE")
    parser.add_argument("--source-dir", type=Path, default=Path("fastdeploy_patch"), help="suite data must be newer")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, cwd: Path | None = None) -> int:
    """Run the gate in ``cwd`` (default: the current directory) and return its exit code."""
    args = parse_args(argv)
    cwd = Path.cwd() if cwd is None else cwd
    xml_path = cwd / args.coverage_xml
    report_dir = cwd / args.report_dir
    suites = [(name, cwd / data) for name, data in args.suite_data]
    try:
        compare, compared_with = compare_options(args.compare_ref, cwd)
        if suites:
            check_suite_data(suites, cwd / args.source_dir, cwd)
            write_coverage_xml(suites, report_dir / "combined.coverage", xml_path, cwd)
        elif not xml_path.is_file():
            raise CheckError(f"{shown(xml_path, cwd)} not found: pass --suite-data, or run `coverage xml` first.")
        report_dir.mkdir(parents=True, exist_ok=True)
        return run_diff_cover(xml_path, compare, compared_with, args.fail_under, report_dir, cwd)
    except (CheckError, OSError) as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        append_to_job_summary(f"**Patch-coverage gate:** error: {exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
