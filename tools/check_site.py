"""Check a built docs site as a reader meets it: ``python tools/check_site.py SITE_DIR``.

CI runs it after ``mkdocs build --strict``. It fails (exit 1, one line per problem) when

- a page loads a script, stylesheet or font from another host (the site must work
  offline: no CDN);
- a link between pages ends in ``/`` (opened from the file system, a browser shows the
  folder's listing, not the page);
- the search index is not inlined (``search/search_index.js``: search from file://);
- the API reference shows private names (``_name``, ``violet_async._module``), a
  Sphinx role or ``~`` left as raw text, or an ``attrs.field(...)`` call as a default.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

_REMOTE_ASSET = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]*\"")
# A relative link to a page (not an anchor, not a file with a suffix) that names a folder.
_FOLDER_LINK = re.compile(r"<a\b[^>]*\bhref=\"(?![a-z]+:|#|/)([^\"#?]*/)(?:#[^\"]*)?\"")
_TAG = re.compile(r"<[^>]+>")
_REFERENCE_PROBLEMS = {
    "a private name": re.compile(r"(?<![\w.)])_[A-Za-z]\w*"),
    "a private module": re.compile(r"violet_async(?:\.\w+)*\._[a-z]\w*"),
    "a raw Sphinx role": re.compile(r":(?:meth|class|func|attr|exc|data|mod|obj):"),
    "a raw ~ cross-reference": re.compile(r"~violet_async\."),
    "an attrs.field(...) default": re.compile(r"attrs\s*\.\s*field\s*\("),
}


def problems(site: Path) -> list[str]:
    found: list[str] = []
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return [f"{site}: no HTML pages"]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(site)
        found += [f"{name}: loads from another host: {a}" for a in _REMOTE_ASSET.findall(text)]
        found += [
            f"{name}: links to a folder, not a page: {link!r}"
            for link in sorted(set(_FOLDER_LINK.findall(text)))
        ]
    if not (site / "search" / "search_index.js").is_file():
        found.append("search/search_index.js: missing (search does not work from file://)")
    reference = site / "reference.html"
    if not reference.is_file():
        found.append("reference.html: missing")
    else:
        shown = re.sub(r"\s+", " ", html.unescape(_TAG.sub(" ", reference.read_text("utf-8"))))
        found += [
            f"reference.html: {what}: {match!r}"
            for what, pattern in _REFERENCE_PROBLEMS.items()
            for match in sorted(set(pattern.findall(shown)))
        ]
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/check_site.py SITE_DIR", file=sys.stderr)
        return 2
    found = problems(Path(argv[0]))
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
