"""Every relative link of the documentation leads somewhere: a file of the repository, and for a ``#fragment`` a
heading of that page, as GitHub names its anchors."""

from __future__ import annotations

import re
from pathlib import Path

from tests.doc_pages import ROOT, pages

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than ``-`` and ``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` (outside code blocks) whose file, or whose heading, does not exist."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        shown = linked.relative_to(root).as_posix() if linked.is_relative_to(root) else str(linked)
        if not linked.exists():
            broken.append(f"{page.name}: {target} (no file {shown})")
        elif fragment and linked.suffix == ".md":
            anchors = {anchor(heading) for heading in HEADING.findall(FENCE.sub("", linked.read_text("utf-8")))}
            if fragment not in anchors:
                broken.append(f"{page.name}: {target} (no heading #{fragment} in {shown})")
    return broken


def test_every_relative_link_of_the_docs_leads_to_a_file_and_heading_that_exist() -> None:
    assert [problem for page in pages() for problem in broken_links(page)] == []


def test_a_missing_file_and_a_missing_heading_are_told_apart(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    guide = "# Guide\n\n## Limits and `--ipc=host`\n\n```md\n# Not a heading\n```\n"
    (tmp_path / "docs" / "guide.md").write_text(guide)
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/guide.md) [ok](docs/guide.md#limits-and---ipchost) [ok](#top) [web](https://example.com/x.md)\n"
        "[gone](docs/gone.md) [no heading](docs/guide.md#not-a-heading) [later](docs/later.md)\n"
        "```md\n[in a code block](docs/nowhere.md)\n```\n\n# Top\n"
    )

    assert broken_links(page, tmp_path) == [
        "README.md: docs/gone.md (no file docs/gone.md)",
        "README.md: docs/guide.md#not-a-heading (no heading #not-a-heading in docs/guide.md)",
        "README.md: docs/later.md (no file docs/later.md)",
    ]
