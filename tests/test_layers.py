"""The layering DESIGN.md draws, checked on the source: one aiohttp-client importer,
one tenacity importer, one cattrs converter."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "violet_async"


def runtime_imports(path: Path) -> set[str]:
    """Top-level modules imported at run time (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from aiohttp import web` is aiohttp.web, not aiohttp's client.
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            for child in ("body", "orelse", "handlers", "finalbody"):
                visit(getattr(node, child, []) or [])

    visit(tree.body)
    return found


def importers(prefix: str, *, allow: tuple[str, ...] = ()) -> set[str]:
    return {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(
            (m == prefix or m.startswith(prefix + "."))
            and not any(m == a or m.startswith(a + ".") for a in allow)
            for m in runtime_imports(path)
        )
    }


def test_only_transport_imports_the_aiohttp_client() -> None:
    """aiohttp.web (servers) is fine elsewhere; the client is _transport.py's alone."""
    assert importers("aiohttp", allow=("aiohttp.web",)) == {"_transport.py"}


def test_only_retry_imports_tenacity() -> None:
    """Retry policy lives in one module."""
    assert importers("tenacity") == {"_retry.py"}


def test_only_converter_builds_a_cattrs_converter() -> None:
    """One cattrs converter, built in _converter.py."""
    assert importers("cattrs") == {"_converter.py"}


def test_exceptions_imports_nothing_of_the_package_at_run_time() -> None:
    """The error module sits below everything: no import circle can run through it."""
    tree = ast.parse((PACKAGE / "exceptions.py").read_text())
    relative = [
        ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "violet_async")
    ]
    assert relative == []
