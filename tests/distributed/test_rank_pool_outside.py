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
