"""The project's documentation pages, for the tests that hold them to what the code and the repository do."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Pages the README already links that other branches write: docs/paddle_ranks.md (the plugin's guide, issue 34) and
# docs/benchmarks.md (the bench modes and their figures). Until a page is merged, links to it are not checked and the
# tests that read it skip. Remove each page from this set when its branch is merged:
# tests/unit/test_doc_links.py fails until then.
PAGES_FROM_OTHER_BRANCHES = frozenset({"docs/paddle_ranks.md"})


def pages() -> list[Path]:
    """Every documentation page: README.md, CONTRIBUTING.md and docs/*.md."""
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
