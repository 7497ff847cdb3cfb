"""Every relative link in README.md and docs/ points at a file that exists, and every
docs page is in the site's navigation (mkdocs --strict checks the site's own links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(markdown: str) -> list[str]:
    # Code blocks show shell lines and Python, not links.
    prose = re.sub(r"^```.*?^```$", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return [
        target.split("#", 1)[0]
        for target in LINK.findall(prose)
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    """A link to a file that is not there fails here, naming the page and the link."""
    broken = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert broken == [], f"{page.name}: broken links {broken}"


def test_the_link_finder_finds_a_broken_link() -> None:
    """The check above can fail: a made-up target is reported, a code block is not."""
    text = "see [x](nowhere.md) and [y](https://example.com)\n```bash\n[z](gone.md)\n```\n"
    assert relative_links(text) == ["nowhere.md"]


def test_every_docs_page_is_in_the_nav() -> None:
    """A page left out of mkdocs.yml's nav is built but unreachable from the menu."""
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES[1:] if f": {p.name}" not in nav]
    assert missing == []
