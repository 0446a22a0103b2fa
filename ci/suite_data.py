"""The checks the gate and the unit-coverage step make of a test suite's coverage data, which coverage would accept.

A suite's data file must exist, be readable by coverage (``coverage combine`` only warns about a file it cannot read,
"Combined 1 file, 1 file errored", and goes on without its lines), have measured a line, and not be older than the
newest file under the source directory (modification times; ``__pycache__`` left out): data measured before the
last edit would judge code it never ran.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from coverage import CoverageData
from coverage.exceptions import CoverageException

# Both steps exit 0 on a pass, 1 below their threshold, and this on an error, such as a failed check.
EXIT_ERROR = 2

# The interpreter that runs the step, so that coverage comes from the environment the step runs in.
COVERAGE_COMMAND: list[str] = [sys.executable, "-m", "coverage"]
TIMEOUT_S = 300


class CheckError(Exception):
    """A precondition failed; the message says what is wrong and which command to run."""


def check_suite_data(suites: Sequence[tuple[str, Path]], source_dir: Path, cwd: Path) -> None:
    """Raise CheckError, naming the tox env to run, unless every ``(name, data file)`` in ``suites`` is present,
    readable by coverage, not empty, and not older than the newest file under ``source_dir``."""
    sources = [path for path in source_dir.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    if not sources:
        raise CheckError(f"no file under the source directory {shown(source_dir, cwd)}: pass --source-dir.")
    newest = max(sources, key=lambda path: path.stat().st_mtime)
    for name, data in suites:
        problem = _problem(data, newest, cwd)
        if problem:
            raise CheckError(
                f"coverage data from the {name} suite ({shown(data, cwd)}) {problem}: run `tox -e {name}`."
            )


def _problem(data: Path, newest_source: Path, cwd: Path) -> str | None:
    if not data.is_file():
        return "not found"
    if data.stat().st_mtime < newest_source.stat().st_mtime:
        return f"is older than {shown(newest_source, cwd)}"
    measured = CoverageData(basename=str(data))
    try:
        measured.read()
    except CoverageException as exc:
        return f"is unreadable ({exc})"
    if not any(measured.lines(path) for path in measured.measured_files()):
        return "measured no line"
    return None


def shown(path: Path, cwd: Path) -> str:
    """Return ``path`` relative to ``cwd`` when it is inside it, as a user in the repository root would type it."""
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def threshold(text: str) -> float:
    """argparse type of a percentage: a number from 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {text!r}")
    return value
