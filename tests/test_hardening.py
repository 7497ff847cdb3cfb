"""Hostile responses and secrets in exception chains: one test per row of the hardening
issue, against servers of our own on 127.0.0.1 (aiohttp.web, or raw asyncio for answers
aiohttp's server would never write)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import stat
import sys
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    APIConnectionError,
    AuthenticationError,
    ResponseFormatError,
    ResponseTooLargeError,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._auth import Auth, Credentials
from violet_async._batch_cli import BatchOptions, run_file
from violet_async.testing import FakeViolet

from .conftest import serve

APP_SECRET = 'app-secret-Zq9"/+&'  # quotes, slash, plus, ampersand: escaped when echoed
TOKEN = "tok.Xy7.secret-token"
PASSWORD = "pässwörd/+ 1"
MiB = 1024 * 1024


def jwt(exp: float, serial: int = 0) -> str:
    """An unsigned JWT with ``exp`` (the client never checks the signature)."""

    def part(data: dict[str, Any]) -> str:
        import base64

        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part({'exp': exp, 'jti': serial})}.sig"


def client_for(base: str, **kwargs: Any) -> VioletClient:
    options: dict[str, Any] = {
        "token": TOKEN,
        "base_url": base + "/v1",
        "retry": RetryPolicy.disabled(),
        **kwargs,
    }
    return VioletClient(11, APP_SECRET, **options)


def chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """No secret in str, repr, the formatted traceback, or any attribute of any
    exception chained to ``exc``."""
    texts = ["".join(traceback.format_exception(exc))]
    for item in chain(exc):
        texts += [str(item), repr(item), repr(vars(item))]
        request_info = getattr(item, "request_info", None)
        texts.append(repr(request_info))
    for secret in secrets:
        for text in texts:
            assert secret not in text
    # aiohttp's exceptions hold request_info.headers: none may be reachable.
    assert not [e for e in chain(exc) if type(e).__module__.startswith("aiohttp")]


# -- hostile aiohttp.web servers ---------------------------------------------------

SENT = web.AppKey("sent", dict)
DONE = web.AppKey("done", asyncio.Event)
FILLER = b"x" * (64 * 1024)  # one buffer, written again and again: never a big body


async def _stream(
    request: web.Request, response: web.StreamResponse, chunks: Iterator[bytes]
) -> web.StreamResponse:
    await response.prepare(request)
    sent = request.app[SENT]
    with contextlib.suppress(ConnectionError):
        for chunk in chunks:
            await response.write(chunk)
            sent[request.path] = sent.get(request.path, 0) + len(chunk)
            # The client runs on this loop: let it read (and hang up) between chunks, as
            # it could from a server of its own (a write the socket takes at once never
            # yields; the bomb's chunks would all be made first, seconds of CPU).
            await asyncio.sleep(0)
    request.app[DONE].set()
    return response


def _repeat(total: int | None, first: bytes = b"") -> Iterator[bytes]:
    if first:
        yield first
    count = 0
    while total is None or count < total:
        yield FILLER
        count += len(FILLER)


def _gzip_bomb(total: int) -> Iterator[bytes]:
    """gzip of ``total`` zero bytes, made 16 MiB at a time as it is sent."""
    zeros = bytes(16 * MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for _ in range(total // len(zeros)):
        piece = deflate.compress(zeros)
        if piece:
            yield piece
    yield deflate.flush()


async def big_body(request: web.Request) -> web.StreamResponse:
    """500 MB announced with Content-Length, streamed 64 KiB at a time."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = 500 * 1000 * 1000
    first = b'{"echo": "' + APP_SECRET.encode() + b'", "pad": "'
    return await _stream(request, response, _repeat(500 * 1000 * 1000 - len(first), first))


async def endless(request: web.Request) -> web.StreamResponse:
    """A chunked body that never ends."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    return await _stream(request, response, _repeat(None))


async def gzip_bomb(request: web.Request) -> web.StreamResponse:
    """About 1 MB on the wire, 1 GiB once unpacked; ?status=500 for an error page."""
    status = int(request.query.get("status", "200"))
    response = web.StreamResponse(status=status, headers={"Content-Encoding": "gzip"})
    response.enable_chunked_encoding()
    return await _stream(request, response, _gzip_bomb(1024 * MiB))


def hostile_app() -> web.Application:
    app = web.Application()
    app[SENT] = {}
    app[DONE] = asyncio.Event()
    app.router.add_get("/v1/orders/1", big_body)
    app.router.add_get("/v1/orders/2", endless)
    app.router.add_get("/v1/orders/3", gzip_bomb)
    return app


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[str, web.Application]]:
    app = hostile_app()
    async with serve(app) as base:
        yield base, app


# -- row 1, 2, 3: bounded responses ------------------------------------------------


async def test_content_length_500mb_is_refused_with_a_prefix(
    hostile: tuple[str, web.Application],
) -> None:
    """Row 1: a 500 MB Content-Length is refused at once, keeping 1 KiB, redacted."""
    base, app = hostile
    async with client_for(base) as client:
        with pytest.raises(ResponseTooLargeError) as info:
            await client.get_order(1)
    error = info.value
    assert isinstance(error, ResponseFormatError)
    assert (error.status, error.limit, error.path) == (200, 4 * MiB, "/orders/1")
    assert len(error.body) <= 1024
    assert error.body.startswith(b'{"echo": "[REDACTED]"')
    assert "Content-Length 500000000" in str(error)
    await asyncio.wait_for(app[DONE].wait(), 30)
    assert app[SENT]["/v1/orders/1"] < 64 * MiB  # the server gave up: the client left


async def test_endless_chunked_body_stops_at_the_cap(
    hostile: tuple[str, web.Application],
) -> None:
    """Row 2: an endless chunked body is read up to max_response_bytes, then dropped."""
    base, app = hostile
    async with client_for(base, max_response_bytes=MiB) as client:
        with pytest.raises(ResponseTooLargeError) as info:
            await client.get_order(2)
    assert info.value.limit == MiB
    assert len(info.value.body) == 1024
    await asyncio.wait_for(app[DONE].wait(), 30)
    assert app[SENT]["/v1/orders/2"] < 64 * MiB


@pytest.mark.parametrize("status", [200, 500])
async def test_gzip_bomb_is_capped_after_decompression(
    hostile: tuple[str, web.Application], status: int
) -> None:
    """Row 3: 1 GiB of gzip'd zeros (a 500 too) stops at the decoded cap; no 1 GiB body."""
    base, _ = hostile
    async with client_for(base) as client:
        transport = client._shared.transport
        with pytest.raises(ResponseTooLargeError) as info:
            await transport.send(
                "GET",
                f"{base}/v1/orders/3?status={status}",
                headers={"X-Violet-Token": TOKEN},
                body=None,
                timeouts=client._timeouts,
            )
    assert info.value.status == status
    assert info.value.body == bytes(1024)
    assert "gzip decompression" in str(info.value)


RSS_PROBE = """
import asyncio, json, sys
from violet_async import ResponseTooLargeError, RetryPolicy, VioletClient
from violet_async.testing import FakeClock

def peak_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

async def main(base):
    result = {"start_mb": peak_mb()}
    async with VioletClient(11, "probe-secret", token="probe-token", base_url=base + "/v1",
                            retry=RetryPolicy(max_attempts=3), clock=FakeClock()) as client:
        for order_id in (1, 2, 3):
            try:
                await client.get_order(order_id)
            except ResponseTooLargeError as exc:
                result[str(order_id)] = [exc.status, len(exc.body)]
    result["peak_mb"] = peak_mb()
    print(json.dumps(result))

asyncio.run(main(sys.argv[1]))
"""


async def test_peak_memory_of_hostile_bodies_stays_small(
    hostile: tuple[str, web.Application],
) -> None:
    """Rows 1-3: 500 MB, endless and gzip-bomb answers, GET retries included, keep a
    client process's peak RSS under 150 MB (the issue saw 1 to 8.5 GB)."""
    base, _ = hostile
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RSS_PROBE,
        base,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    print("peak RSS", result)  # shown with -s: the figure the CHANGELOG quotes
    assert result["1"] == [200, 1024]
    assert result["2"] == [200, 1024]
    assert result["3"] == [200, 1024]
    assert result["peak_mb"] < 150


# -- row 4: malformed responses ----------------------------------------------------


@contextlib.asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[str]:
    """Reads a request's head, writes ``answer`` as it is, closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


MALFORMED = {
    "status 9999999": b"HTTP/1.1 9999999 OK\r\nContent-Length: 0\r\n\r\n",
    "5000 headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % n for n in range(5000))
    + b"Content-Length: 0\r\n\r\n",
    "20 KB header line": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=list(MALFORMED))
async def test_malformed_response_chain_holds_no_secret(answer: bytes) -> None:
    """Row 4: a malformed answer is an APIConnectionError with nothing chained, and no
    secret in str, repr or the formatted traceback of anything reachable from it."""
    async with raw_server(answer) as base, client_for(base) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.get_order(1)
    error = info.value
    assert error.__cause__ is None
    assert error.request_sent is True
    assert error.path == "/orders/1"
    assert error.host == "127.0.0.1"
    assert f"127.0.0.1:{error.port}" in str(error)
    assert error.error_type
    assert "\n" not in str(error)
    assert_no_secret(error, APP_SECRET, TOKEN)


async def test_transport_errors_chain_nothing() -> None:
    """Row 4: the transport raises its errors with no __cause__ and no __context__."""
    answer = MALFORMED["status 9999999"]
    async with raw_server(answer) as base, client_for(base) as client:
        with pytest.raises(APIConnectionError) as info:
            await client._shared.transport.send(
                "GET",
                base + "/v1/orders/1",
                headers={"X-Violet-App-Secret": APP_SECRET},
                body=None,
                timeouts=client._timeouts,
            )
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert info.value.__suppress_context__ is False


# -- row 5: servers that echo the request ------------------------------------------


def echo_app(*, login_status: int = 200, refund_status: int = 400) -> web.Application:
    """Login echoes the body on ``login_status``; other calls echo every header."""

    async def login(request: web.Request) -> web.Response:
        body = await request.text()
        if login_status != 200:
            message = f"bad login request: {body}"
            return web.json_response({"message": message, "error_code": 13}, status=400)
        token = jwt(time.time() + 3600)
        return web.json_response({"token": token, "refresh_token": "refresh-Secret-1"})

    async def echo(request: web.Request) -> web.Response:
        listing = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
        return web.json_response(
            {"message": f"upstream refused: {listing}"},
            status=refund_status,
            headers={"X-Echo": request.headers.get("X-Violet-App-Secret", "")},
        )

    app = web.Application()
    app.router.add_post("/v1/login", login)
    app.router.add_route("*", "/v1/orders/{tail:.*}", echo)
    return app


async def test_login_400_quoting_the_password_is_redacted() -> None:
    """Row 5: a login 400 that quotes the request body names no password or secret."""
    async with serve(echo_app(login_status=400)) as base:
        client = client_for(base, token=None, username="ann", password=PASSWORD)
        async with client:
            with pytest.raises(AuthenticationError) as info:
                await client.get_order(1)
    error = info.value
    assert "[REDACTED]" in str(error)
    assert str(error).startswith("POST /login -> 400 (error_code 13): bad login request")
    assert_no_secret(error, PASSWORD, APP_SECRET, json.dumps(PASSWORD)[1:-1])


async def test_api_error_redacts_message_body_and_headers() -> None:
    """Row 5: api_error_from_response(redact=...) hides secrets in all it keeps, in
    their JSON-escaped and URL-encoded spellings too."""
    from urllib.parse import quote

    from violet_async._redact import Redactor
    from violet_async.exceptions import api_error_from_response

    creds = Credentials(app_id=1, app_secret=APP_SECRET, password=PASSWORD, token=TOKEN)
    body = orjson.dumps(
        {
            "message": f"headers: X-Violet-App-Secret: {APP_SECRET}; token {TOKEN.upper()}",
            "error": json.dumps({"password": PASSWORD}),
            "url": f"/x?p={quote(PASSWORD, safe='')}",
        }
    )
    error = api_error_from_response(
        502,
        body,
        {"X-Echo": APP_SECRET},
        method="GET",
        path="/orders/1",
        redact=Redactor(creds.secrets),
    )
    texts = [str(error), repr(error), error.body.decode(), repr(error.headers)]
    for secret in (APP_SECRET, TOKEN, TOKEN.upper(), PASSWORD, json.dumps(PASSWORD)[1:-1]):
        for text in texts:
            assert secret not in text
    assert quote(PASSWORD, safe="") not in error.body.decode()
    assert error.headers == {"X-Echo": "[REDACTED]"}


async def test_echoing_502_is_redacted_end_to_end() -> None:
    """Row 5: a 502 listing the request headers reaches the caller redacted."""
    async with serve(echo_app(refund_status=502)) as base, client_for(base) as client:
        with pytest.raises(VioletError) as info:
            await client.get_order(1)
    assert_no_secret(info.value, APP_SECRET, TOKEN)


async def test_cli_output_is_private_and_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 5: --output is created 0600 and names no secret, even when Violet's
    messages quote the app secret and the token."""
    async with serve(echo_app()) as base:
        for key, value in {
            "VIOLET_APP_ID": "11",
            "VIOLET_APP_SECRET": APP_SECRET,
            "VIOLET_USERNAME": "ann",
            "VIOLET_PASSWORD": PASSWORD,
            "VIOLET_BASE_URL": base + "/v1",
        }.items():
            monkeypatch.setenv(key, value)
        source = tmp_path / "in.csv"
        source.write_text("order_id,bag_id,amount_refunded\n1,2,100\n")
        output = tmp_path / "out.jsonl"
        options = BatchOptions(output=output, journal=tmp_path / "journal.jsonl")
        code = await run_file("refund", source, options, out=io.StringIO(), err=io.StringIO())
    assert code == 1
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    text = output.read_text()
    assert "[REDACTED]" in text
    for secret in (APP_SECRET, json.dumps(APP_SECRET)[1:-1], PASSWORD, "refresh-Secret-1"):
        assert secret not in text


# -- row 10: bad values are typed errors -------------------------------------------


async def test_crlf_token_from_the_server_is_refused() -> None:
    """Row 10: a login answering a token with CR/LF is an AuthenticationError, and the
    token never goes into a header."""
    seen: list[str] = []

    async def login(request: web.Request) -> web.Response:
        return web.json_response({"token": "abc\r\nX-Injected: 1"})

    async def orders(request: web.Request) -> web.Response:  # pragma: no cover - never
        seen.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/login", login)
    app.router.add_get("/v1/orders/1", orders)
    async with serve(app) as base:
        client = client_for(base, token=None, username="ann", password=PASSWORD)
        async with client:
            with pytest.raises(AuthenticationError, match="printable ASCII"):
                await client.get_order(1)
    assert seen == []


async def test_control_characters_in_refreshed_tokens_are_refused() -> None:
    """Row 10: a refresh answering a NUL in the token, or a login a bad refresh token,
    is refused before either is used."""
    answers: list[tuple[int, bytes]] = [(200, orjson.dumps({"token": "a\x00b"}))]

    async def send(method: str, path: str, body: bytes | None, token: str | None) -> Any:
        return answers.pop(0)

    creds = Credentials(app_id=1, app_secret="s", refresh_token="r", token=jwt(0))
    with pytest.raises(AuthenticationError, match="refresh answered without a usable"):
        await Auth(creds, send).token()
    answers.append((200, orjson.dumps({"token": "ok", "refresh_token": "r\nX: 1"})))
    creds = Credentials(app_id=1, app_secret="s", username="u", password="p")
    with pytest.raises(AuthenticationError, match="refresh token that is not printable"):
        await Auth(creds, send).token()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VIOLET_APP_SECRET", "abc\ndef"),
        ("VIOLET_TOKEN", "tok\r\nX-Injected: 1"),
        ("VIOLET_PASSWORD", "pw\x00"),
        ("VIOLET_APP_ID", "²"),
        ("VIOLET_APP_ID", "١٢"),
        ("VIOLET_APP_ID", "0"),
    ],
)
def test_bad_environment_is_a_typed_error_naming_the_variable(variable: str, value: str) -> None:
    """Row 10: a control character or a non-ASCII digit in VIOLET_* raises
    RequestValidationError naming the variable, never showing its value."""
    from violet_async import RequestValidationError

    env = {"VIOLET_APP_ID": "12", "VIOLET_APP_SECRET": "s", "VIOLET_TOKEN": "t", variable: value}
    with pytest.raises(RequestValidationError) as info:
        VioletClient.from_env(env)
    assert info.value.field == variable
    assert value not in str(info.value)


@pytest.mark.parametrize("field", ["app_secret", "token", "refresh_token"])
def test_header_values_with_newlines_are_refused_by_the_constructor(field: str) -> None:
    """Row 10: VioletClient refuses a secret or token with CR/LF before any I/O."""
    from violet_async import RequestValidationError

    kwargs: dict[str, Any] = {"app_secret": "s", "token": "t", field: "x\r\ny"}
    app_secret = kwargs.pop("app_secret")
    with pytest.raises(RequestValidationError) as info:
        VioletClient(1, app_secret, **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("variable", "value"), [("VIOLET_APP_SECRET", "s\nt"), ("VIOLET_APP_ID", "²")]
)
async def test_cli_prints_one_line_for_bad_configuration(
    tmp_path: Path, variable: str, value: str
) -> None:
    """Row 10: the CLI reports a bad VIOLET_* value in one line and exits 2."""
    import os

    source = tmp_path / "in.csv"
    source.write_text("order_id,bag_id,amount_refunded\n1,2,100\n")
    env = {
        **os.environ,
        "VIOLET_APP_ID": "12",
        "VIOLET_APP_SECRET": "s",
        "VIOLET_TOKEN": "t",
        variable: value,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "violet_async",
        "refund",
        str(source),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, raw_err = await asyncio.wait_for(process.communicate(), 60)
    err = raw_err.decode()
    assert process.returncode == 2
    assert err.count("\n") == 1
    assert err.startswith(f"violet-async: configuration: {variable}: ")
    assert value not in err


def test_cli_turns_an_sdk_error_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row 10: an SDK error escaping a command is one line (exit 1 or 2), no traceback."""
    import violet_async.__main__ as cli
    from violet_async import RequestValidationError

    def fail(error: VioletError) -> Callable[..., Any]:
        def run(*args: Any) -> int:
            raise error

        return run

    monkeypatch.setattr(cli, "_main", fail(RequestValidationError("x", "bad")))
    assert cli.main(["demo"]) == 2
    monkeypatch.setattr(
        cli,
        "_main",
        fail(
            AuthenticationError(
                "no",
                status=401,
                error_code=None,
                body=b"",
                headers={},
                method="POST",
                path="/login",
            )
        ),
    )
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "violet-async: configuration: x: bad",
        "violet-async: AuthenticationError: POST /login -> 401: no",
    ]


# -- row 11: clock skew cannot cause a login storm --------------------------------


async def test_client_clock_five_minutes_ahead_logs_in_once() -> None:
    """Row 11: a 2-minute token is already expired by a clock 5 minutes ahead; 200
    calls (100 at once, 100 in a row) still cause exactly one login."""
    async with FakeViolet(orders=2, token_lifetime=120.0) as fake:
        async with fake.client(retry=RetryPolicy.disabled()) as client:
            shared = client._shared
            shared.auth = Auth(shared.credentials, client._auth_send, now=lambda: time.time() + 300)
            order_id, bag_id = fake.seeded[0]
            await asyncio.gather(*(client.list_bag_refunds(order_id, bag_id) for _ in range(100)))
            for _ in range(100):
                await client.list_bag_refunds(order_id, bag_id)
        assert (fake.ledger.logins, fake.ledger.refreshes) == (1, 0)
        assert fake.ledger.requests["list_refunds"] == 200


class ScriptedLogin:
    """An AuthSend whose tokens expire ``life`` seconds after the *server's* time."""

    def __init__(self, server_now: Callable[[], float], life: float, date: bool) -> None:
        self.server_now = server_now
        self.life = life
        self.date = date
        self.logins = 0

    async def __call__(self, method: str, path: str, body: bytes | None, token: str | None) -> Any:
        self.logins += 1
        answer = orjson.dumps({"token": jwt(self.server_now() + self.life, self.logins)})
        if not self.date:
            return 200, answer
        from email.utils import formatdate

        return 200, answer, {"Date": formatdate(self.server_now(), usegmt=True)}


@pytest.mark.parametrize("date", [True, False], ids=["with Date", "without Date"])
async def test_fresh_tokens_are_not_renewed_in_a_storm(date: bool) -> None:
    """Row 11: with the client 5 minutes ahead, with or without a Date header, 200
    calls make one login; renewals then come at most once a minute."""
    server = [1_000_000.0]
    send = ScriptedLogin(lambda: server[0], life=120.0, date=date)
    creds = Credentials(app_id=1, app_secret="s", username="u", password="p")
    auth = Auth(creds, send, now=lambda: server[0] + 300)
    await asyncio.gather(*(auth.token() for _ in range(100)))
    for _ in range(100):
        await auth.token()
    assert send.logins == 1
    for _ in range(10):  # ten minutes of calls, one every six seconds
        for _ in range(10):
            server[0] += 6
            await auth.token()
    assert send.logins == 11  # the first, then one a minute (half the 2-minute life)


async def test_fresh_tokens_refused_as_expired_stop_renewals() -> None:
    """Row 11: when Violet refuses every fresh token as expired, renewals stop after
    two and calls fail with AuthenticationError instead of logging in each time."""
    now = [5_000.0]
    send = ScriptedLogin(lambda: now[0], life=3600.0, date=True)
    auth = Auth(
        Credentials(app_id=1, app_secret="s", username="u", password="p"), send, now=lambda: now[0]
    )
    first = await auth.token()
    second = await auth.expired(first)  # refused at once: renew once
    assert send.logins == 2
    for _ in range(50):
        with pytest.raises(AuthenticationError, match="just issued"):
            await auth.expired(second)
    assert send.logins == 2
    now[0] += 60  # once the token is a minute old, an expiry is an ordinary one again
    assert await auth.expired(second) != second
    assert send.logins == 3


async def test_unreadable_auth_answers_are_typed_and_bad_dates_ignored() -> None:
    """Row 10: a login answer that is not a JSON object is an AuthenticationError
    saying so once; an unreadable Date header is ignored, not trusted."""
    answers: list[Any] = [
        (200, b"<html>", {}),
        (200, orjson.dumps({"token": jwt(10_000.0)}), {"Date": "yesterday-ish"}),
    ]

    async def send(method: str, path: str, body: bytes | None, token: str | None) -> Any:
        return answers.pop(0)

    auth = Auth(
        Credentials(app_id=1, app_secret="s", username="u", password="p"), send, now=lambda: 0.0
    )
    with pytest.raises(AuthenticationError) as info:
        await auth.token()
    assert str(info.value) == "POST /login -> 200: unreadable answer (not a JSON object)"
    await auth.token()
    assert auth.current() is not None  # 10,000 s of life by our own clock


# -- row 12: private state hides secrets -------------------------------------------


async def test_reprs_of_private_state_hide_secrets() -> None:
    """Row 12: repr of the client's shared state, transport, auth, credentials and
    redactor shows no secret."""
    client = VioletClient(
        11,
        APP_SECRET,
        username="ann",
        password=PASSWORD,
        token=TOKEN,
        refresh_token="refresh-Secret-1",
    )
    shared = client._shared
    texts = [
        repr(client),
        repr(shared),
        repr(shared.transport),
        repr(shared.auth),
        repr(shared.credentials),
        repr(shared.auth.redactor),
    ]
    for text in texts:
        for secret in (APP_SECRET, PASSWORD, TOKEN, "refresh-Secret-1"):
            assert secret not in text
    await client.aclose()


# -- messages ----------------------------------------------------------------------


async def test_login_refusal_message_does_not_repeat_itself() -> None:
    """A wrong password reads 'POST /login -> 401 (error_code 13): Invalid username or
    password', once."""
    async with FakeViolet(orders=1) as fake:
        client = VioletClient(
            fake.app_id,
            fake.app_secret,
            username=fake.username,
            password="wrong",
            base_url=fake.base_url,
            retry=RetryPolicy.disabled(),
        )
        async with client:
            with pytest.raises(AuthenticationError) as info:
                await client.get_order(fake.seeded[0][0])
    assert str(info.value) == (
        "POST /login -> 401 (error_code 13): Invalid username or password [request id req_fake_1]"
    )


async def test_connection_refused_names_host_port_and_reason() -> None:
    """A refused connection names host:port and 'connection refused', with the path
    relative to the base URL, and is marked as never sent."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with client_for(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(APIConnectionError) as info:
            await client.get_order(7)
    error = info.value
    assert str(error) == f"GET /orders/7: cannot connect to 127.0.0.1:{port} (connection refused)"
    assert (error.request_sent, error.errno, error.reason) == (False, 111, "connection refused")
    assert error.__cause__ is None
    assert_no_secret(error, APP_SECRET, TOKEN)


async def test_dns_failure_names_the_resolver_reason() -> None:
    """A DNS failure names the host and the resolver's text."""
    import socket

    import aiohttp

    class NoDNS(aiohttp.abc.AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> Any:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        async def close(self) -> None:
            return None

    connector = aiohttp.TCPConnector(resolver=NoDNS())
    async with aiohttp.ClientSession(connector=connector) as session:
        client = client_for("http://violet.invalid:8080", session=session, allow_insecure_http=True)
        async with client:
            with pytest.raises(APIConnectionError) as info:
                await client.get_order(1)
    message = str(info.value)
    assert message.startswith("GET /orders/1: cannot connect to violet.invalid:8080 (DNS lookup")
    assert "Name or service not known" in message


# -- round two: what a 2xx body, a capture, a span and a header can carry ---------


def echo_page_app(*, status: int = 200, request_id: str = "req-1") -> web.Application:
    """Every call answers ``status`` with an HTML page (not JSON) that starts by echoing
    the request's headers, the app secret 70 characters in: a cut at 80 would keep its
    first 10 characters."""

    async def page(request: web.Request) -> web.Response:
        padding = "p" * (70 - len("<html>"))
        text = f"<html>{padding}{request.headers.get('X-Violet-App-Secret', '')}"
        text += " ".join(f"{k}={v}" for k, v in request.headers.items())
        return web.Response(
            text=text, status=status, content_type="text/html", headers={"X-Request-Id": request_id}
        )

    app = web.Application()
    app.router.add_route("*", "/v1/orders/{tail:.*}", page)
    return app


async def test_a_2xx_page_echoing_the_secret_is_redacted_before_its_preview() -> None:
    """Round 2, row 5: a 200 whose body is not JSON and echoes the request gives a
    ResponseFormatError whose text, ``.body`` and chain hold no part of the app secret
    or the token (the preview is cut from the redacted body, not before)."""
    long_secret = "S3cr3t-abcdefghijklmnopqrstuvwxyz"
    async with serve(echo_page_app()) as base:
        async with VioletClient(
            11, long_secret, token=TOKEN, base_url=base + "/v1", retry=RetryPolicy.disabled()
        ) as client:
            with pytest.raises(ResponseFormatError) as info:
                await client.get_order(1)
    error = info.value
    assert "[REDACTED]" in str(error)
    assert b"[REDACTED]" in error.body
    # Not even the first characters of the secret survive the 80-character preview.
    assert long_secret[:8] not in str(error)
    assert_no_secret(error, long_secret, TOKEN, long_secret[:8])


def test_a_preview_cut_never_keeps_the_start_of_a_secret() -> None:
    """Round 2, row 5: a preview is redacted first, and a tail that starts a secret
    (a body cut inside one) is dropped."""
    from violet_async._redact import Redactor

    redactor = Redactor(extra=["SECRET-0123456789"])
    body = b"x" * 70 + b"SECRET-0123456789 and more"
    assert "SECRET" not in redactor.preview(body, 80)
    assert redactor.preview(body, 80).startswith("x" * 70 + "[REDACTED]")
    assert redactor.preview(b"x" * 70 + b"SECRET-01", 200) == "x" * 70
    assert redactor.preview(b"plain text", 5) == "plain"


async def test_captured_responses_are_redacted_copies() -> None:
    """Round 2, row 6: ``capture_responses()`` keeps a gateway page that echoes the
    request with the app secret and the token redacted, headers included."""
    from violet_async.telemetry import capture_responses

    async with serve(echo_app(refund_status=502)) as base, client_for(base) as client:
        with capture_responses() as seen, pytest.raises(VioletError):
            await client.get_order(1)
    assert seen
    for resp in seen:
        assert APP_SECRET.encode() not in resp.body
        assert TOKEN.encode() not in resp.body
        assert b"[REDACTED]" in resp.body
        assert APP_SECRET not in "".join(resp.headers.values())
        assert resp.headers.get("x-echo") == "[REDACTED]"  # still case-insensitive


@pytest.mark.parametrize(
    "request_id",
    [b"\x1b[2K\rfake", b"ok\x1b]52;c;cm0gLXJmIH4=\x07", b"\x9b31mok", b"caf\xc3\xa9"],
)
async def test_request_ids_are_printable_ascii_only(
    request_id: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 2, row 7: an X-Request-Id with ESC, an OSC 52 (clipboard) code, a C1 CSI or
    anything but printable ASCII is not taken as a request id: not on the error, not in
    its message, not in the DEBUG line (a raw server: aiohttp.web would not send it)."""
    import logging

    body = b'{"message": "no"}'
    answer = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-Request-Id: "
        + request_id.replace(b"\r", b"")
        + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    async with raw_server(answer) as base, client_for(base) as client:
        with caplog.at_level(logging.DEBUG, "violet_async"), pytest.raises(VioletError) as info:
            await client.get_order(1)
    assert getattr(info.value, "request_id", "missing") is None
    logged = "\n".join(r.getMessage() for r in caplog.records) + str(info.value)
    assert not any(c in logged for c in "\x1b\x07\x9b\udc9b")


def test_printable_escapes_every_control_character() -> None:
    """Round 2, row 7: the one helper for text from a server or an input file writes
    ESC, CR, LF, BEL, C1 controls and bidi overrides as escapes, and leaves printable
    text (accents included) alone."""
    from violet_async._redact import printable

    assert printable("café 1,2") == "café 1,2"
    escaped = printable("a\x1b[31mb\rc\nd\x07e\x9bf\u202eg\x00")
    assert escaped == "a\\x1b[31mb\\x0dc\\x0ad\\x07e\\x9bf\\u202eg\\x00"
    assert escaped.isprintable()


async def test_spans_carry_no_userinfo() -> None:
    """Round 2, row 11: ``url.full`` on an attempt span has no ``user:password@``."""
    from violet_async._telemetry import _without_userinfo

    assert _without_userinfo("http://ann:pw@127.0.0.1:8080/v1/x?y=1") == (
        "http://127.0.0.1:8080/v1/x?y=1"
    )
    assert _without_userinfo("http://127.0.0.1/v1/a@b") == "http://127.0.0.1/v1/a@b"
    assert _without_userinfo("/relative") == "/relative"


def test_aiohttp_floor_excludes_the_gzip_body_cves() -> None:
    """Round 2, row 12: the aiohttp floor is a release that fixes CVE-2025-69223 and
    CVE-2026-54278 (3.14.1), and the installed aiohttp meets it."""
    import re as regex
    from importlib.metadata import version

    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    floor = regex.search(r'"aiohttp>=([0-9.]+)"', text)
    assert floor is not None
    parts = tuple(int(p) for p in floor.group(1).split("."))
    assert parts >= (3, 14, 1)
    installed = tuple(int(p) for p in regex.findall(r"\d+", version("aiohttp"))[:3])
    assert installed >= parts


HOSTILE_TEXT = "\x1b[2K\rline 1: succeeded\x1b]52;c;cm0gLXJmIH4=\x07\x9b31m"


async def test_server_text_reaches_the_terminal_and_the_problems_file_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2, row 7: an error message with ESC, CR, an OSC 52 clipboard code and a
    C1 CSI reaches the CLI summary and the problems file as escapes: no fake
    "succeeded" line, no clipboard write."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"message": HOSTILE_TEXT}, status=400)

    app = web.Application()
    app.router.add_route("*", "/v1/orders/{tail:.*}", refuse)
    async with serve(app) as base:
        for key, value in {
            "VIOLET_APP_ID": "11",
            "VIOLET_APP_SECRET": APP_SECRET,
            "VIOLET_TOKEN": jwt(time.time() + 3600),
            "VIOLET_BASE_URL": base + "/v1",
        }.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("VIOLET_USERNAME", raising=False)
        monkeypatch.delenv("VIOLET_PASSWORD", raising=False)
        source = tmp_path / "in.csv"
        source.write_text("order_id,bag_id,amount_refunded\n1,2,100\n")
        journal = tmp_path / "journal.jsonl"
        out, err = io.StringIO(), io.StringIO()
        options = BatchOptions(journal=journal)
        code = await run_file("refund", source, options, out=out, err=err)
    assert code == 1
    problems = journal.with_name(journal.name + ".problems.txt").read_text()
    for text in (out.getvalue(), err.getvalue(), problems):
        assert not any(c in text for c in "\x1b\r\x07\x9b"), repr(text)
    assert "\\x1b[2K\\x0dline 1: succeeded" in problems
    assert "\\x1b[2K\\x0dline 1: succeeded" in out.getvalue()
