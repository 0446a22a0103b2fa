"""The project's own coverage rule as a CI step: the unit tests alone cover every line and branch of the package.

Usage, from the repository root::

    python ci/unit_coverage.py [--data-file coverage-data/unit.coverage] [--source-dir fastdeploy_patch]
                               [--fail-under 100]

It runs no test. After the checks of suite_data.py on the data ``tox -e unit`` left, ``coverage report --show-missing
--skip-covered`` lists the files under ``--source-dir`` that miss a line or a branch, and fails below
``--fail-under``. Exit codes: 0 at or above it, 1 below, 2 an error (one line starting ``unit-coverage: error:``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from suite_data import COVERAGE_COMMAND, EXIT_ERROR, TIMEOUT_S, CheckError, check_suite_data, threshold

# `coverage report`'s exit codes (0 pass, 1 its own error, 2 below --fail-under) in this step's.
EXIT_CODES = {0: 0, 2: 1}


def main(argv: Sequence[str] | None = None, cwd: Path | None = None) -> int:
    """Check the unit suite's coverage in ``cwd`` (default: the current directory) and return the exit code."""
    parser = argparse.ArgumentParser(prog="unit-coverage", epilog="Exit codes: 0 pass, 1 below, 2 error.")
    parser.add_argument("--data-file", type=Path, default=Path("coverage-data/unit.coverage"))
    parser.add_argument("--source-dir", type=Path, default=Path("fastdeploy_patch"))
    parser.add_argument("--fail-under", type=threshold, default=100.0)
    args = parser.parse_args(argv)
    cwd = Path.cwd() if cwd is None else cwd
    try:
        check_suite_data([("unit", cwd / args.data_file)], cwd / args.source_dir, cwd)
    except CheckError as exc:
        print(f"unit-coverage: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    options = ["--show-missing", "--skip-covered", f"--fail-under={args.fail_under}", f"--include={args.source_dir}/*"]
    command = [*COVERAGE_COMMAND, "report", f"--data-file={args.data_file}", *options]
    code = subprocess.run(command, cwd=cwd, timeout=TIMEOUT_S, check=False).returncode
    if code not in EXIT_CODES:
        print(f"unit-coverage: error: `coverage report` failed (exit {code}); its output is above.", file=sys.stderr)
    return EXIT_CODES.get(code, EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
