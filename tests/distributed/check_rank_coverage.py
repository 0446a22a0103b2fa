"""Check that a combined coverage data file holds what only non-zero ranks run.

``python -m tests.distributed.check_rank_coverage [DATA_FILE]`` runs after the distributed tests. The lines it
checks are the side of ``signal_group._rendezvous_store`` that only a group's non-first members execute; every
group's first member in these tests is rank 0 or another rank below them, and the test process itself never
joins a group. So when those lines are covered, coverage measured code that ran inside non-zero ranks and
combined it with the parent's. Exit code 0 when covered, 1 (with the missing lines) otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from coverage import CoverageData

from fastdeploy_patch import signal_group

FUNCTION = "_rendezvous_store"


def non_first_member_lines(source: str, function: str = FUNCTION) -> tuple[int, list[int]]:
    """The line of ``function``'s ``if`` on the first member, and the statements only other members run
    (those after that ``if``, which returns)."""
    tree = ast.parse(source)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    index, branch = next((i, n) for i, n in enumerate(func.body) if isinstance(n, ast.If))
    if not isinstance(branch.body[-1], ast.Return) or branch.orelse:
        raise ValueError(f"{function} no longer has the shape 'if first member: ... return' this check relies on")
    return branch.lineno, [stmt.lineno for stmt in func.body[index + 1 :]]


def missing(data_file: str) -> tuple[list[int], list[str]]:
    """The non-first-member lines and branch arcs of ``signal_group`` not covered in ``data_file``."""
    source_path = Path(signal_group.__file__).resolve()
    if_line, lines = non_first_member_lines(source_path.read_text())
    data = CoverageData(basename=data_file)
    data.read()
    measured = [f for f in data.measured_files() if Path(f).as_posix().endswith("fastdeploy_patch/signal_group.py")]
    if not measured:
        return lines, [f"{data_file} has no data for fastdeploy_patch/signal_group.py"]
    covered_lines = set().union(*(data.lines(f) or [] for f in measured))
    covered_arcs = set().union(*(data.arcs(f) or [] for f in measured))
    problems = []
    if data.has_arcs() and (if_line, lines[0]) not in covered_arcs:
        problems.append(f"branch {if_line}->{lines[0]} (not the first member) was never taken")
    return [line for line in lines if line not in covered_lines], problems


def main(argv: list[str]) -> int:
    data_file = argv[0] if argv else ".coverage"
    lines_missing, problems = missing(data_file)
    where = f"fastdeploy_patch/signal_group.py:{FUNCTION}"
    if lines_missing or problems:
        print(f"FAIL: {where}: lines run only by non-zero ranks are not covered: {lines_missing} {problems}")
        return 1
    _, lines = non_first_member_lines(Path(signal_group.__file__).read_text())
    print(f"OK: {where} lines {lines}, run only by non-zero ranks, are covered in {data_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
