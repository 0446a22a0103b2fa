"""The README's paddle_ranks example, run as a user would: copied out of README.md into a temporary directory outside
this repository (no conftest, no PYTHONPATH to the checkout), collected by a pytest that finds the plugin only
through the installed package's entry point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- paddle_ranks example -->", "<!-- end of paddle_ranks example -->"


def readme_example() -> tuple[str, str]:
    """The example's file name (from its first line) and its source, exactly as the README shows them."""
    block = README.read_text(encoding="utf-8").split(START, 1)[1].split(END, 1)[0]
    source = re.fullmatch(r"\s*```python\n(.*)```\s*", block, re.S).group(1)
    name = re.match(r"# (test_\w+)\.py: run with `pytest test_\w+\.py`\n", source).group(1)
    return name, source


def test_the_readme_example_passes_from_a_directory_outside_the_repository(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    name, source = readme_example()
    pytester.makepyfile(**{name: source})
    assert README.parent not in pytester.path.parents
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"{name}.py", timeout=300)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["paddle_ranks: 1 pool start, 3 calls served, 0 recycles"])


OTHER_FILE = """
import json
import os
from pathlib import Path

from test_allreduce import sum_of_ranks


def test_another_file_on_whichever_worker_gets_it(paddle_ranks):
    results = paddle_ranks.run(sum_of_ranks, 2, kwargs={"scale": 3})
    assert [r["sum"] for r in results] == [3, 3]
    Path("worker-" + os.environ["PYTEST_XDIST_WORKER"]).write_text(json.dumps([r["pid"] for r in results]))
"""


def test_the_plugin_under_xdist_keeps_pools_per_worker_and_sums_their_summary(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    name, source = readme_example()
    pytester.makepyfile(**{name: source, "test_other": OTHER_FILE})
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile", "--rootdir", str(pytester.path), timeout=300
    )
    result.assert_outcomes(passed=3)
    workers = sorted(p.name for p in pytester.path.glob("worker-*"))
    assert workers in (["worker-gw0"], ["worker-gw1"]), workers
    # Each worker started the pool its file used, and served its file's calls (3 in the README's, 1 in the other):
    # the controller's one line adds them up.
    result.stdout.fnmatch_lines(["paddle_ranks: 2 pool starts, 4 calls served, 0 recycles"])
