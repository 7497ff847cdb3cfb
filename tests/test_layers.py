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


# -- one engine: batch, fleet and the simulator drive asks through it, never the client --

#: The code that drives asks besides the client: it holds an engine (engine_of), never
#: the client's internals.
DRIVERS = ("batch.py", "fleet", "testing/sim")


def client_private_names() -> set[str]:
    """Every private member of VioletClient and the request layer under it: methods,
    and attributes the client sets on itself or on a clone."""
    names: set[str] = set()
    for module in ("_client.py", "_requests.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in ("VioletClient", "RequestPlumbing"):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "clone")
                and isinstance(node.ctx, ast.Store)
            ):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def driver_files() -> list[Path]:
    files: list[Path] = []
    for name in DRIVERS:
        path = PACKAGE / name
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def reach_ins(path: Path, private: set[str]) -> list[str]:
    """``x._name`` for a private client member ``_name`` on anything but ``self`` /
    ``cls`` (its own members), and private names imported from the client module."""
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in private
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        if (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").endswith("_client")
            and any(alias.name.startswith("_") for alias in node.names)
        ):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_client_private_names_are_found(tmp_path: Path) -> None:
    """The check below looks for what it should (a guard on the guard): the client's
    private members, and a reach-in planted in a file."""
    private = client_private_names()
    assert {"_shared", "_retry", "_timeouts", "_on_retry", "_engine", "_attempt"} <= private
    assert "_ask" not in private  # gone: Engine.drive is the one driver
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from .._client import VioletClient, _unless_failed\n"
        "async def job(self, client):\n"
        "    await self.client._ask(1)\n"
        "    self._on_retry(client._shared.clock)\n"
    )
    assert reach_ins(planted, private | {"_ask"}) == [
        "planted.py:1: from .._client import VioletClient, _unless_failed",
        "planted.py:3: self.client._ask",
        "planted.py:4: client._shared",
    ]


def test_batch_fleet_and_sim_never_reach_into_the_client() -> None:
    """The batch runner, the fleet worker and the simulator drive asks through the engine
    (``engine_of(client).drive``): none calls ``VioletClient._ask`` (gone), reads
    ``client._shared``, ``client._retry``... or imports a private name of ``_client``."""
    private = client_private_names() | {"_ask"}
    files = driver_files()
    assert any(p.name == "_worker.py" for p in files)
    assert any(p.name == "_run.py" for p in files)
    found = [hit for path in files for hit in reach_ins(path, private)]
    assert found == []


def test_only_the_engine_drives_an_ask() -> None:
    """The protocol's drivers (``run_ask``, ``after_failed_send``) are called from the
    engine alone: no second driver of an ask anywhere in the package."""
    callers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "_reconcile.py"
        and any(
            isinstance(node, ast.Name) and node.id in ("run_ask", "after_failed_send")
            for node in ast.walk(ast.parse(path.read_text()))
        )
    }
    assert callers == {"_engine.py"}
