"""Throwaway git repositories with real coverage data, for testing ci/gate.py end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

GATE_PATH = Path(__file__).resolve().parents[2] / "ci" / "gate.py"
CHILD_TIMEOUT_S = 60

# Runs the code under test as a real program under coverage's API, measuring only one package (`pkg` unless the
# test says otherwise), and writes coverage.xml the way the project's config does (relative paths unless the test
# asks otherwise).
_MEASURE = """
import coverage

cov = coverage.Coverage(data_file={data_file!r}, config_file=False, source=[{source!r}], branch=True)
cov.set_option("run:relative_files", {relative})
cov.start()
{calls}
cov.stop()
cov.save()
if {xml}:
    cov.xml_report(outfile="coverage.xml")
"""


def run_python(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ``args`` in ``cwd``; return its exit code and what it printed, stdout and stderr
    apart."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )


@dataclass
class Repo:
    """A git work tree in a temporary directory, with helpers to change it, commit and measure coverage."""

    path: Path

    def git(self, *args: str) -> str:
        """Run git in the repository; return its stdout, failing the test if git fails."""
        result = subprocess.run(
            ["git", *args], cwd=self.path, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
        )
        assert result.returncode == 0, f"git {' '.join(args)} failed: {result.stderr}"
        return result.stdout

    def write(self, relpath: str, text: str) -> None:
        """Write ``text`` (dedented) to ``relpath``, creating folders."""
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")

    def commit(self, message: str) -> None:
        """Commit every change in the work tree."""
        self.git("add", "--all")
        self.git("commit", "--quiet", "--message", message)

    def measure(
        self,
        calls: str,
        *,
        relative: bool = True,
        data_file: str = ".coverage",
        xml: bool = True,
        source: str = "pkg",
    ) -> None:
        """Run ``calls`` (Python statements) under coverage of the package ``source``, saving the data in
        ``data_file``, and write coverage.xml in the repository unless ``xml`` is False."""
        script = _MEASURE.format(
            relative=relative, calls=textwrap.dedent(calls).strip(), data_file=data_file, xml=xml, source=source
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=self.path,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        assert result.returncode == 0, f"measuring failed: {result.stderr}"


@dataclass(frozen=True)
class GateRun:
    """What one gate run returned and printed."""

    code: int
    out: str
    err: str
