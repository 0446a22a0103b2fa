"""Run a pytest suite under coverage in every process it starts, and prove that code inside the ranks was measured.

``python -m tests.distributed.check_rank_coverage DATA_FILE -- PYTEST_ARGS...`` (what ``tox -e distributed`` runs):

1. erases ``DATA_FILE`` and its per-process files, then runs ``python -m coverage run --data-file=DATA_FILE -m pytest
   -p tests.distributed.check_rank_coverage PYTEST_ARGS``. ``[tool.coverage.run] patch = ["subprocess"]`` makes the
   test processes and every rank they start write a file of their own, ``DATA_FILE.<host>.pid<PID>.<random>``. The
   test processes are the pytest process this script started and, under pytest-xdist (``-n``), its workers: this
   module, loaded as a plugin, has each of them write its pid to a file the script reads afterwards, so their files
   are told apart from the ranks'.
2. checks that the lines of the rendezvous that only a group's non-first members run (``FUNCTION`` in the first of
   ``SOURCES`` that exists) are covered in a file written by a process other than the test processes. Mocked unit
   tests run those lines in a test process itself, so on their data the check fails, with or without xdist; it
   passes only when coverage measured real non-zero ranks.
3. when both passed, combines every per-process file into ``DATA_FILE``. A failed run leaves no ``DATA_FILE``, so
   ``tox -e gate`` reports the data missing instead of judging a change by it.

A per-process file that is not valid coverage data (a process killed while coverage wrote it leaves a truncated
SQLite file) is skipped by the check and by the combine step, never in silence: the script prints how many it
skipped and which, with coverage's reason. The check still fails when the readable files lack the lines it needs.

Exit code: pytest's when it failed (5 when it collected no test), else 1 when the check failed, else coverage
combine's (0).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from coverage import CoverageData
from coverage.exceptions import CoverageException

ROOT = Path(__file__).resolve().parents[2]
# The gloo group's own rendezvous store: its first member serves it, every other member connects to it.
SOURCES = ("fastdeploy_patch/signal_group/rendezvous.py",)
FUNCTION = "gloo_store"
MODULE = "tests.distributed.check_rank_coverage"
TEST_PIDS_VAR = "CHECK_RANK_COVERAGE_TEST_PIDS"
"""The file each pytest process of the run (this module loaded as a plugin) appends its pid to: the main process and
every xdist worker run tests, so none of them counts as a rank."""
_WRITER_PID = re.compile(r"\.pid(\d+)\.")


def pytest_configure(config: object) -> None:
    """As a pytest plugin (``-p tests.distributed.check_rank_coverage``): record this test process's pid."""
    path = os.environ.get(TEST_PIDS_VAR)
    if path:
        with open(path, "a", encoding="ascii") as pids:
            pids.write(f"{os.getpid()}\n")


def recorded_test_pids(path: Path) -> set[int]:
    """The pids that the run's test processes wrote to ``path`` (``TEST_PIDS_VAR``)."""
    return {int(line) for line in path.read_text(encoding="ascii").split()}


def writer_pid(path: Path) -> int | None:
    """The pid of the process that wrote the per-process data file ``path``, from coverage's name for it."""
    found = _WRITER_PID.search(path.name)
    return int(found.group(1)) if found else None


def non_first_member_lines(source: str, function: str = FUNCTION) -> tuple[int, list[int]]:
    """The line of ``function``'s ``if`` on the first member, and the statements only other members run
    (those after that ``if``, which returns)."""
    tree = ast.parse(source)
    func = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if func is None:
        raise ValueError(f"no function {function} here: update FUNCTION in {MODULE}")
    index, branch = next((i, n) for i, n in enumerate(func.body) if isinstance(n, ast.If))
    if not isinstance(branch.body[-1], ast.Return) or branch.orelse:
        raise ValueError(f"{function} no longer has the shape 'if first member: ... return' this check relies on")
    return branch.lineno, [stmt.lineno for stmt in func.body[index + 1 :]]


def rendezvous_source(root: Path = ROOT) -> str:
    """The first of ``SOURCES`` that exists under ``root``, relative to it (as coverage's relative paths are)."""
    for relpath in SOURCES:
        if (root / relpath).is_file():
            return relpath
    raise FileNotFoundError(f"none of {SOURCES} exists under {root}: update SOURCES in {MODULE}")


def process_files(data_file: Path) -> list[Path]:
    """The per-process data files that coverage's parallel mode wrote for ``data_file``."""
    return sorted(data_file.parent.glob(f"{data_file.name}.*"))


SETTLE_S = 0.5
"""How long the per-process file names must stay the same before they are read: coverage 7.17 renames a data file
on every save (it appends a hash of the data), so a process still exiting after pytest (a pool rank saving its last
call) can rename a file between listing and combining; one CI run failed that way."""
SETTLE_TRIES = 20


def settled_process_files(data_file: Path, sleep=time.sleep) -> list[Path]:
    """``process_files(data_file)`` once two listings ``SETTLE_S`` apart agree (at most ``SETTLE_TRIES`` tries)."""
    files = process_files(data_file)
    for _ in range(SETTLE_TRIES):
        sleep(SETTLE_S)
        again = process_files(data_file)
        if again == files:
            break
        files = again
    return files


def read_process_files(files: Sequence[Path]) -> tuple[dict[Path, CoverageData], dict[Path, str]]:
    """Read each per-process data file; return ``{file: data}`` for the valid ones and ``{file: coverage's reason}``
    for the others."""
    readable: dict[Path, CoverageData] = {}
    invalid: dict[Path, str] = {}
    for path in files:
        data = CoverageData(basename=str(path))
        try:
            data.read()
        except CoverageException as exc:
            invalid[path] = str(exc)
        else:
            readable[path] = data
    return readable, invalid


def skipped_report(invalid: dict[Path, str]) -> str:
    """What to print about the files skipped as not valid coverage data; empty when none was."""
    if not invalid:
        return ""
    lines = [
        f"skipped {len(invalid)} data file(s) that are not valid coverage data (a process killed while writing it):"
    ]
    lines += [f"  {path.name}: {reason}" for path, reason in sorted(invalid.items())]
    return "\n".join(lines)


def missing_in_ranks(
    data_file: Path,
    test_pids: Collection[int],
    root: Path = ROOT,
    readable: dict[Path, CoverageData] | None = None,
) -> list[str]:
    """What the per-process files of ``data_file`` lack outside the test processes ``test_pids`` (pytest's and its
    xdist workers'): the rendezvous's non-first-member lines and its branch to them. Empty when every one ran in
    another process.

    Only ``readable`` files count (default: those of ``data_file`` that ``read_process_files`` can read)."""
    relpath = rendezvous_source(root)
    if_line, lines = non_first_member_lines((root / relpath).read_text(encoding="utf-8"))
    if readable is None:
        readable, _ = read_process_files(process_files(data_file))
    own = [f for f in readable if writer_pid(f) in test_pids]
    others = [f for f in readable if f not in own]
    if not own:
        return [
            f"no coverage data from the test processes (pids {sorted(test_pids)}) next to {data_file}: "
            "were they measured?"
        ]
    if not others:
        return [
            f"no process other than the test processes wrote coverage data next to {data_file}: no rank was measured"
        ]
    covered_lines: set[int] = set()
    covered_arcs: set[tuple[int, int]] = set()
    for path in others:
        data = readable[path]
        for measured in data.measured_files():
            if Path(measured).as_posix().endswith(relpath):
                covered_lines.update(data.lines(measured) or [])
                covered_arcs.update(data.arcs(measured) or [])
    problems = [
        f"{relpath}:{line} ({FUNCTION}) did not run in any rank" for line in lines if line not in covered_lines
    ]
    if covered_arcs and (if_line, lines[0]) not in covered_arcs:
        problems.append(f"{relpath}: branch {if_line}->{lines[0]} (not the first member) was never taken in a rank")
    return problems


def check_and_combine(data_file: Path, test_pids: Collection[int], root: Path = ROOT) -> int:
    """After a passing pytest run: the check, then (when it passed) the valid per-process files combined into
    ``data_file``. Prints what it skipped and its verdict; returns 1 when the check failed, else combine's code."""
    readable, invalid = read_process_files(settled_process_files(data_file))
    skipped = skipped_report(invalid)
    if skipped:
        print(skipped)
    problems = missing_in_ranks(data_file, test_pids, root, readable)
    where = f"{rendezvous_source(root)}:{FUNCTION}"
    if problems:
        print(f"FAIL: {where}: the lines only non-zero ranks run were not measured in a rank:")
        print("\n".join(f"  {problem}" for problem in problems))
        return 1
    print(f"OK: {where}: the lines only non-zero ranks run were measured inside the ranks")
    # Only a passing run leaves DATA_FILE, so the gate never judges a change by the data of a failed run. The
    # files are named: `coverage combine` on the folder would warn about an invalid one and go on, where the
    # warning is easy to miss; the skipped ones are reported above and stay for a look.
    return _coverage("combine", "--quiet", f"--data-file={data_file}", *(str(path) for path in readable))


def _coverage(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "coverage", *args], check=False).returncode


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print(f"usage: python -m {MODULE} DATA_FILE -- PYTEST_ARGS...", file=sys.stderr)
        return 2
    data_file = Path(argv[0]).resolve()
    data_file.parent.mkdir(parents=True, exist_ok=True)
    # Files left by an earlier run would count as ranks measured now.
    CoverageData(basename=str(data_file)).erase(parallel=True)
    with tempfile.TemporaryDirectory(prefix="check-rank-coverage-") as scratch:
        pids_file = Path(scratch) / "test-pids"
        pids_file.touch()
        run = [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}", "-m", "pytest", "-p", MODULE]
        suite = subprocess.Popen([*run, *argv[2:]], env={**os.environ, TEST_PIDS_VAR: str(pids_file)})
        code = suite.wait()
        # The pytest process this script started records its own pid too (coverage runs pytest in it).
        test_pids = recorded_test_pids(pids_file)
    if code != 0:
        return code
    return check_and_combine(data_file, test_pids)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
