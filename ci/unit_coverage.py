"""The project's own coverage rule as a CI step of its own: the unit tests alone cover every line and branch.

Usage, from the repository root::

    python ci/unit_coverage.py [--data-file coverage-data/unit.coverage] [--source-dir fastdeploy_patch]
                               [--fail-under 100]

It runs no test. It reads the data ``tox -e unit`` publishes when its tests pass, after the checks the
patch-coverage gate makes of a suite's data (the file exists, is readable, measured a line and is not older than
the newest file under ``--source-dir``). Then it prints coverage's report of every file under ``--source-dir``
that is not fully covered, with its missing lines and branches, and a verdict line. ``tox -e unit-coverage`` runs
it; ``.ci/run`` runs it after the gate, also when the gate failed, so that both verdicts are printed.

Exit codes (the gate's):
    0  total line and branch coverage of ``--source-dir`` at or above ``--fail-under`` (100 by default);
    1  below it;
    2  precondition error, one line starting ``unit-coverage: error:`` that names the tox env to run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# ci/ is a folder of scripts: gate.py sits next to this one, and `python ci/unit_coverage.py` puts ci/ on sys.path.
from gate import (
    COVERAGE_COMMAND,
    EXIT_BELOW_THRESHOLD,
    EXIT_ERROR,
    EXIT_PASS,
    SUBPROCESS_TIMEOUT_S,
    GateError,
    check_suite_data,
    format_threshold,
)

SUITE = "unit"
DEFAULT_DATA_FILE = Path("coverage-data/unit.coverage")
DEFAULT_FAIL_UNDER = 100.0
PROG = "unit-coverage"
# `coverage report` exits with this when the total is below --fail-under (and 1 on its own errors).
COVERAGE_BELOW_FAIL_UNDER = 2


def _coverage(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COVERAGE_COMMAND, *args], cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )


def report(data_file: Path, source_dir: Path, fail_under: float, cwd: Path) -> tuple[int, str]:
    """Return the exit code and the text to print: coverage's table of the files under ``source_dir`` (relative to
    ``cwd``) that miss a line or a branch, with what they miss, then the verdict. Raise GateError when coverage
    cannot report the data."""
    common = [f"--data-file={data_file}", f"--include={source_dir}/*"]
    table = _coverage(["report", *common, "--show-missing", "--skip-covered", f"--fail-under={fail_under}"], cwd)
    total = _coverage(["report", *common, "--format=total"], cwd)
    if table.returncode not in (EXIT_PASS, COVERAGE_BELOW_FAIL_UNDER) or total.returncode != EXIT_PASS:
        output = (table.stdout + table.stderr).strip()
        raise GateError(f"`coverage report` failed (exit {table.returncode}): {output}: run `tox -e {SUITE}` again.")
    shown = f"{total.stdout.strip()}%"
    if table.returncode == COVERAGE_BELOW_FAIL_UNDER:
        verdict = (
            f"FAIL: the unit tests cover {shown} of the lines and branches of {source_dir}/, below the "
            f"{format_threshold(fail_under)} the project requires; the table above lists what they miss"
        )
        return EXIT_BELOW_THRESHOLD, f"{table.stdout.rstrip()}\n{verdict}"
    return (
        EXIT_PASS,
        f"{table.stdout.rstrip()}\nPASS: the unit tests cover {shown} of the lines and branches of {source_dir}/",
    )


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; exit 2 on a bad value."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fail when the unit tests alone cover less than all lines and branches of the package.",
        epilog="Exit codes: 0 pass, 1 below the threshold, 2 precondition error.",
    )
    parser.add_argument("--data-file", type=Path, default=DEFAULT_DATA_FILE, help="default %(default)s")
    parser.add_argument("--source-dir", type=Path, default=Path("fastdeploy_patch"), help="default %(default)s")
    parser.add_argument("--fail-under", type=_threshold, default=DEFAULT_FAIL_UNDER, help="default 100")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, cwd: Path | None = None) -> int:
    """Check the unit suite's coverage in ``cwd`` (default: the current directory); print and return the verdict."""
    args = parse_args(argv)
    cwd = Path.cwd() if cwd is None else cwd
    data_file = cwd / args.data_file
    source_dir = cwd / args.source_dir
    try:
        check_suite_data([(SUITE, data_file)], source_dir, cwd)
        code, text = report(data_file, args.source_dir, args.fail_under, cwd)
    except GateError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
