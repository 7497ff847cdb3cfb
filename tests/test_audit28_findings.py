"""Issue 28's audit: a new user's first week, tried again in a fresh clone. Each test is
a way the first week broke: a base URL typo that escaped as a traceback, README's
examples, its command-line walkthrough and fake-server's own "file to try" refunding
the same bags, an example left out of README, and a docs site that could not be read
from the file system."""
# The files read here are a test's tiny inputs and the repository's docs: blocking
# reads are fine.

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    APIConnectionError,
    RequestValidationError,
    VioletClient,
)
from violet_async.__main__ import _fake_server_banner
from violet_async.testing import FakeViolet

from .samples import refund_body
from .test_batch_cli import env_for
from .test_cli_first_week import NO_SERVER, journal_states, run
from .test_examples import EMBEDDED_ONLY, EXPECTED, clean_env, run_example

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:99999/v1",  # a port out of range
        "http://127.0.0.1:80a/v1",  # a port that is not a number
        "http://[::1/v1",  # a broken IPv6 host
        "http://127.0.0.1:8080/v1 ",  # a space pasted after it
        " http://127.0.0.1:8080/v1",  # ... or before it
        "http://127.0.0.1:8080/v 1",
        "https://sandbox-api.violet.io/v1\n",
        b"https://sandbox-api.violet.io/v1",
        8080,
    ],
)
def test_a_base_url_that_does_not_parse_is_a_typed_error_naming_it(base_url: Any) -> None:
    """Was a bare ValueError from the URL parser (or a 404 at login, or a silently
    stripped space): a typed error naming base_url, raised before any I/O."""
    with pytest.raises(RequestValidationError) as caught:
        VioletClient(app_id=1, app_secret="app-secret-1", token="token-1", base_url=base_url)
    assert caught.value.field == "base_url"


async def test_a_base_url_port_typo_exits_2_in_one_line_and_marks_no_row_failed(
    tmp_path: Path,
) -> None:
    """Was a yarl traceback and exit 1: an extra digit in VIOLET_BASE_URL's port."""
    async with FakeViolet(orders=1, seed=1) as fake:
        (o, b) = fake.seeded[0]
        path = tmp_path / "refunds.csv"
        path.write_text(f"order_id,bag_id,amount_refunded\n{o},{b},100\n")
        port = fake.base_url.rsplit(":", 1)[1].split("/", 1)[0]
        typo = {**env_for(fake), "VIOLET_BASE_URL": fake.base_url.replace(port, port + "0")}
        code, out, err = await run("refund", str(path), env=typo)
        assert code == 2, out + err
        assert "Traceback" not in err
        assert err.count("\n") == 1, err
        assert "VIOLET_BASE_URL" in err
        assert "failed" not in journal_states(path)
        assert fake.ledger.requests["login"] == 0


def readme_example_names() -> list[str]:
    """The files README's Examples table lists, in its order."""
    section = (ROOT / "README.md").read_text().split("## Examples", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| \[`(\w+\.py)`\]\(examples/\1\)", section, re.MULTILINE)


def test_readme_lists_every_example() -> None:
    """web_app_refund.py and arq_refund_job.py were missing from README's table."""
    assert sorted(readme_example_names()) == sorted(EXPECTED)


def cli_walkthrough_file() -> str:
    """The refunds.csv that docs/cli.md's walkthrough writes (its heredoc)."""
    page = (ROOT / "docs" / "cli.md").read_text()
    found = re.search(r"cat > refunds\.csv <<'CSV'\n(.*?)^CSV$", page, re.MULTILINE | re.DOTALL)
    assert found, "docs/cli.md no longer writes refunds.csv"
    return found[1]


async def test_readme_examples_walkthrough_and_banner_file_share_one_fake_server(
    tmp_path: Path,
) -> None:
    """A new user on one `violet-async fake-server` (1,000 orders, seed 1): every example
    in README's order, then docs/cli.md's walkthrough, then the file fake-server itself
    suggests. Each does what its page says. Was: audit_from_python.py audited the bags
    batch_from_python.py had just refunded (``audit: {'extra': 3}``, not as_asked), and
    the banner's file refunded bag 200003, which refund_and_cancel.py had cancelled."""
    async with FakeViolet(orders=1000, seed=1) as fake:
        env = clean_env(env_for(fake))
        for name in readme_example_names():
            if name in EMBEDDED_ONLY:
                continue
            code, out = await run_example(name, env)
            assert code == 0, f"{name}: {out}"
            assert re.search(EXPECTED[name], out, re.MULTILINE), f"{name}: {out}"

        # docs/cli.md: the file with a wrong bag on line 4, then that row fixed.
        walkthrough = tmp_path / "refunds.csv"
        walkthrough.write_text(cli_walkthrough_file())
        code, out, err = await run("refund", str(walkthrough), env=env)
        assert code == 1, out + err
        assert "succeeded               2" in out
        assert "line 4: order 100023 bag 999999: failed: NotFoundError" in out
        walkthrough.write_text(walkthrough.read_text().replace("999999", "200023"))
        code, out, err = await run("refund", str(walkthrough), env=env)
        assert code == 0, out + err
        assert "already_done            2" in out
        assert "(1 sent this run)" in out
        # docs/audit.md: the same file audited, with the summary line the page shows
        # (it said USD 113.68 for these three bags; fake-server's are USD 123.65).
        code, out, err = await run("audit", str(walkthrough), env=env)
        assert code == 0, out + err
        audit_page = (ROOT / "docs" / "audit.md").read_text()
        shown = re.search(r"^#   (as_asked            3  USD [\d.]+)$", audit_page, re.MULTILINE)
        assert shown, "docs/audit.md no longer shows the walkthrough's audit"
        assert f"  {shown[1]}\n" in out, out

        # fake-server's "a file to try", pasted as it prints it.
        banner = _fake_server_banner(fake).splitlines()
        tried = tmp_path / "tried.csv"
        tried.write_text("".join(line[4:] + "\n" for line in banner if line.startswith("#   ")))
        code, out, err = await run("refund", str(tried), env=env)
        assert code == 0, out + err
        assert "succeeded               3" in out


def test_no_page_installs_violet_async_from_the_package_index() -> None:
    """violet-async is not published: `pip install violet-async` (docs/cli.md) failed
    for a new user, and would install whatever another party publishes under that name.
    Pages and examples install from a checkout (`pip install -e '.[fleet]'`)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += sorted((ROOT / "examples").glob("*.py"))
    index_install = re.compile(r"pip install\s+(?:--?[\w-]+\s+)*['\"]?violet-async\b")
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            assert not index_install.search(line), f"{page.name}:{number}: {line}"


def _site(tmp_path: Path, pages: dict[str, str], *, search: bool = True) -> Path:
    site = tmp_path / "site"
    for name, body in pages.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(f"<html><body>{body}</body></html>")
    if search:
        (site / "search").mkdir()
        (site / "search" / "search_index.js").write_text("var __index = {}")
    return site


CLEAN_REFERENCE = (
    '<h3 id="violet_async.RefundBagRequest.skus">skus</h3><code>skus: Sequence[SkuRefund]'
    " | None = None</code><p>the same money (<code>same_money</code>)</p>"
)


@pytest.mark.parametrize(
    ("planted", "problem"),
    [
        ('<a href="cli/">The command line</a>', "links to a folder"),
        ('<a href="../cli/#configuration">Configuration</a>', "links to a folder"),
        ('<script src="https://unpkg.com/iframe-worker/shim"></script>', "another host"),
        ('<link rel="stylesheet" href="//fonts.example/x.css">', "another host"),
        ("<code>~violet_async._journal_index.same_money</code>", "private module"),
        ("<p>See <code>violet_async._telemetry</code></p>", "private module"),
        ("<p>as :meth:<code>aclose</code></p>", "Sphinx role"),
        ("<code>= attrs.field(default=None, converter=_skus_tuple)</code>", "attrs.field"),
        ('<h3 id="violet_async.batch.held_message">held_message</h3><p>_Runner</p>', "private"),
    ],
)
def test_the_site_check_finds_what_a_reader_would_meet(
    tmp_path: Path, planted: str, problem: str
) -> None:
    """tools/check_site.py, which CI runs on the built site, fails on each defect the
    site had: directory links (opened from the file system they list a folder), a CDN
    script, private names and raw roles in the API reference."""
    from tools.check_site import problems

    clean = {"index.html": '<a href="cli.html">CLI</a>', "reference.html": CLEAN_REFERENCE}
    assert problems(_site(tmp_path / "clean", clean)) == []
    page = "reference.html" if "href" not in planted else "index.html"
    planted_site = _site(tmp_path / "bad", {**clean, page: clean[page] + planted})
    found = problems(planted_site)
    assert found, planted
    assert any(problem in line for line in found), found


def test_the_site_check_wants_search_that_works_from_the_file_system(tmp_path: Path) -> None:
    from tools.check_site import problems

    site = _site(tmp_path, {"index.html": "", "reference.html": CLEAN_REFERENCE}, search=False)
    assert any("search_index.js" in line for line in problems(site))


def test_ci_checks_the_built_site() -> None:
    """The check runs on the site CI builds, after mkdocs build --strict."""
    ci = (ROOT / ".ci" / "run").read_text()
    build = r"mkdocs build --strict --site-dir \"\$site\"\n"
    assert re.search(build + r".*python tools/check_site\.py \"\$site\"", ci)


TLS = ROOT / "tests" / "fixtures" / "tls"


class ConnectProxy:
    """An HTTPS proxy on 127.0.0.1: answers CONNECT with ``status`` and, on 200, pipes
    the tunnel's bytes to its target. Records each CONNECT line and its headers."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.connects: list[tuple[str, dict[str, str]]] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        self.connects.append((lines[0], dict(x.split(": ", 1) for x in lines[1:] if ": " in x)))
        method, target, _ = lines[0].split(" ")
        if method != "CONNECT" or self.status != 200:
            status = 405 if method != "CONNECT" else self.status
            writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@contextlib.asynccontextmanager
async def connect_proxy(status: int = 200) -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy(status)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield proxy
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def https_violet() -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A scripted Violet over TLS (the fixture certificate): refunds bag 2 of order 1
    and lists them. Yields its base URL and every request it saw."""
    seen: list[web.Request] = []
    made: list[dict[str, Any]] = []

    async def refund(request: web.Request) -> web.Response:
        seen.append(request)
        body = await request.json()
        made.append(
            refund_body(
                id=400001 + len(made),
                order_id=1,
                bag_id=2,
                amount=body["amount_refunded"],
                date_created=time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime()),
            )
        )
        return web.json_response(made[-1])

    async def listed(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response(made)

    app = web.Application()
    app.router.add_post("/v1/orders/1/bags/2/refunds", refund)
    app.router.add_get("/v1/orders/1/bags/2/refunds", listed)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "localhost-cert.pem", TLS / "localhost-key.pem")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/v1", seen
    finally:
        await runner.cleanup()


def tls_session() -> aiohttp.ClientSession:
    trusted = ssl.create_default_context(cafile=str(TLS / "localhost-cert.pem"))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted))


async def test_https_through_a_connect_proxy_gives_its_credentials_to_the_proxy_only() -> None:
    """Violet is https: the proxy gets a CONNECT carrying Proxy-Authorization and then
    only TLS bytes; Violet never sees the proxy's credentials."""
    async with https_violet() as (base_url, seen), connect_proxy() as proxy, tls_session() as s:
        with_auth = proxy.url.replace("http://", "http://ops:s3cret-proxy@")
        async with VioletClient(
            1, "app-secret-1", token="token-1", base_url=base_url, proxy=with_auth, session=s
        ) as client:
            refund = await client.refund_bag(1, 2, amount_refunded=500)
        assert (refund.id, refund.amount) == (400001, 500)
        assert [line.split(" ")[0] for line, _ in proxy.connects] == ["CONNECT"]
        expected = "Basic " + base64.b64encode(b"ops:s3cret-proxy").decode()
        assert all(h.get("Proxy-Authorization") == expected for _, h in proxy.connects)
        assert [r.method for r in seen] == ["POST"]
        assert not any("Proxy-Authorization" in r.headers for r in seen)


@pytest.mark.parametrize("status", [407, 403, 502])
async def test_a_proxy_that_refuses_the_tunnel_sent_nothing_and_says_so(status: int) -> None:
    """Was: "connection failed after sending", request_sent=True, and a refund ended
    AmbiguousOutcomeError ("may or may not have applied", a pending record to resume)
    after 38 CONNECTs, though the tunnel never opened and nothing reached Violet."""
    async with (
        https_violet() as (base_url, seen),
        connect_proxy(status) as proxy,
        tls_session() as s,
    ):
        dead_end = proxy.url.replace("http://", "http://ops:wrong-password@")
        async with VioletClient(
            1, "app-secret-1", token="token-1", base_url=base_url, proxy=dead_end, session=s
        ) as client:
            with pytest.raises(APIConnectionError) as caught:
                await client.refund_bag(1, 2, amount_refunded=500)
        assert not isinstance(caught.value, AmbiguousOutcomeError)
        assert caught.value.request_sent is False
        assert f"the proxy refused the tunnel: {status}" in str(caught.value)
        assert "wrong-password" not in str(caught.value) + repr(caught.value)
        assert seen == []


@pytest.mark.parametrize(
    ("proxy_env", "expected"),
    [
        ({"HTTPS_PROXY": "http://127.0.0.1:3128"}, "HTTPS_PROXY is set, but violet-async never"),
        ({"https_proxy": "http://127.0.0.1:3128"}, "set VIOLET_PROXY to its http:// URL"),
        ({"VIOLET_PROXY": "http://127.0.0.1:3128"}, "VIOLET_PROXY and the network"),
    ],
)
async def test_an_unreachable_violet_names_the_proxy_variable(
    tmp_path: Path, proxy_env: dict[str, str], expected: str
) -> None:
    """Behind a corporate proxy named by HTTPS_PROXY (which curl and pip read, the SDK
    never does), the operator saw only "cannot reach Violet ... check the network"."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        path = tmp_path / "refunds.csv"
        path.write_text("order_id,bag_id,amount_refunded\n100001,200001,100\n")
        env = {**NO_SERVER, "VIOLET_BASE_URL": f"http://127.0.0.1:{port}/v1", **proxy_env}
        code, out, err = await run("refund", str(path), env=env)
    assert code == 2, out + err
    assert "cannot reach Violet" in err
    assert expected in err
    assert "failed" not in journal_states(path)


# What Python on Windows lacks besides fcntl and loop signal handlers: O_NOFOLLOW,
# O_NONBLOCK and O_CLOEXEC, geteuid / getuid, and (before 3.13) os.fchmod, (before 3.12)
# os.set_blocking. Taken away before the CLI runs, after the event loop module loaded.
WINDOWS_OS = """
import os, shutil, sys
for name in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "geteuid", "getuid", "fchmod",
             "set_blocking"):
    if hasattr(os, name):
        delattr(os, name)
# The standard library's own Windows path: rmtree walks by name there (no dir_fd, no
# O_NONBLOCK, which Python 3.13's fd-based walk on Linux needs).
shutil._use_fd_functions = False
"""


async def windows_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    from .test_portable import LIKE_WINDOWS

    prelude = LIKE_WINDOWS.replace("import asyncio, sys\n", "import asyncio, sys\n" + WINDOWS_OS)
    return await run(*args, env=env, python=prelude)


async def test_refund_and_audit_with_output_files_run_without_unix_only_os_functions(
    tmp_path: Path,
) -> None:
    """Was: every `refund` / `cancel` run opened its problems file with os.fchmod, which
    Python on Windows has only from 3.13 (AttributeError before the first send), and
    `audit` opened its journal and --output with os.O_NOFOLLOW and os.geteuid, which
    Windows never has. The commands run, and write their files, without them."""
    async with FakeViolet(orders=3, seed=4) as fake:
        rows = [f"{o},{b},100,portable" for o, b in fake.seeded]
        csv = tmp_path / "refunds.csv"
        csv.write_text("order_id,bag_id,amount_refunded,reason\n" + "\n".join(rows) + "\n")
        env = env_for(fake)
        code, out, err = await windows_cli(
            "refund", str(csv), "--output", str(tmp_path / "out.jsonl"), env=env
        )
        assert code == 0, out + err
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
        code, out, err = await windows_cli(
            "audit", str(csv), "--output", str(tmp_path / "audit.jsonl"), env=env
        )
        assert code == 0, out + err
        assert re.search(r"^  as_asked            3 ", out, re.MULTILINE), out
        assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 3
        assert fake.ledger.refunds_per_bag == {b: 1 for _, b in fake.seeded}


def test_the_flags_files_are_opened_with_are_the_platforms_own() -> None:
    """Where the platform has O_NOFOLLOW, O_NONBLOCK and O_CLOEXEC (here), files a run
    trusts are opened with them: 0 would follow a planted symlink and block on a FIFO."""
    from violet_async import _files

    assert (_files.NOFOLLOW, _files.NONBLOCK, _files.CLOEXEC) == (
        os.O_NOFOLLOW,
        os.O_NONBLOCK,
        os.O_CLOEXEC,
    )
    assert 0 not in (_files.NOFOLLOW, _files.NONBLOCK, _files.CLOEXEC)
