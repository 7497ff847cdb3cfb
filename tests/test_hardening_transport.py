"""The transport's own body decoding and bounds: every Content-Encoding it accepts is
decoded correctly, every other one and every broken stream is a typed error."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from violet_async import (
    APIConnectionError,
    APITimeoutError,
    RequestValidationError,
    ResponseFormatError,
    ResponseTooLargeError,
    Timeouts,
)
from violet_async._redact import REDACTED, Redactor, has_control_character
from violet_async._transport import Transport

from .conftest import serve

PAYLOAD = b'{"id": 1, "note": "' + b"refund " * 2000 + b'"}'


def deflate(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


BODIES: dict[str, tuple[str, bytes]] = {
    "gzip": ("gzip", gzip.compress(PAYLOAD)),
    "x-gzip": ("x-gzip", gzip.compress(PAYLOAD)),
    "gzip, two members": ("gzip", gzip.compress(PAYLOAD[:500]) + gzip.compress(PAYLOAD[500:])),
    "deflate (zlib)": ("deflate", deflate(PAYLOAD, zlib.MAX_WBITS)),
    "deflate (raw)": ("deflate", deflate(PAYLOAD, -zlib.MAX_WBITS)),
    "identity, chunked": ("identity", PAYLOAD),
}


def app_answering(encoding: str, body: bytes, *, status: int = 200) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Encoding": encoding})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start : start + 4096])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/x", handler)
    return app


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    transport = Transport(None, base_url="http://127.0.0.1/v1", max_response_bytes=64 * 1024)
    await transport.open()
    yield transport
    await transport.aclose()


async def get(transport: Transport, base: str, **kwargs: Any) -> Any:
    return await transport.send(
        "GET", base + "/v1/x", headers={}, body=None, timeouts=Timeouts(), **kwargs
    )


@pytest.mark.parametrize(("encoding", "body"), BODIES.values(), ids=list(BODIES))
async def test_accepted_encodings_decode_exactly(
    transport: Transport, encoding: str, body: bytes
) -> None:
    """gzip (several members too), deflate with or without the zlib header, and
    identity are decoded to the exact body."""
    async with serve(app_answering(encoding, body)) as base:
        response = await get(transport, base)
    assert response.body == PAYLOAD


BROKEN: dict[str, tuple[str, bytes, str]] = {
    "corrupt gzip": ("gzip", b"\x1f\x8b\x08\x00garbage-garbage", "cannot be decoded"),
    "truncated gzip": ("gzip", gzip.compress(PAYLOAD)[:-40], "ended early"),
    "brotli": ("br", b"\x0b\x02\x80hello\x03", "unsupported Content-Encoding 'br'"),
}


@pytest.mark.parametrize(("encoding", "body", "problem"), BROKEN.values(), ids=list(BROKEN))
async def test_broken_or_unasked_encodings_are_format_errors(
    transport: Transport, encoding: str, body: bytes, problem: str
) -> None:
    """A corrupt or truncated stream, or an encoding never asked for, is a
    ResponseFormatError carrying the status and the relative path."""
    async with serve(app_answering(encoding, body, status=201)) as base:
        with pytest.raises(ResponseFormatError, match=problem) as info:
            await get(transport, base)
    assert (info.value.status, info.value.path, info.value.body) == (201, "/x", b"")
    assert not isinstance(info.value, ResponseTooLargeError)


async def test_endless_empty_gzip_members_are_bounded(transport: Transport) -> None:
    """gzip members that decode to nothing cannot stream forever: compressed input is
    capped too."""
    empty_member = gzip.compress(b"")

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Encoding": "gzip"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = empty_member * 3000
        try:
            while True:
                await response.write(block)
        except ConnectionError:
            return response

    app = web.Application()
    app.router.add_get("/v1/x", handler)
    async with serve(app) as base:
        with pytest.raises(ResponseTooLargeError, match="compressed body too long"):
            await get(transport, base)


async def test_identity_over_the_cap_without_length(transport: Transport) -> None:
    """A body with no Content-Length is cut at the cap; a body at the cap passes."""
    at_cap = b"a" * (64 * 1024)
    async with serve(app_answering("identity", at_cap)) as base:
        assert (await get(transport, base)).body == at_cap
    async with serve(app_answering("identity", at_cap + b"b")) as base:
        with pytest.raises(ResponseTooLargeError, match="more than 65536 bytes"):
            await get(transport, base)


@pytest.mark.parametrize("value", [0, 1023, True, 2.5, "4096"])
def test_max_response_bytes_is_validated(value: Any) -> None:
    """max_response_bytes must be an int of at least 1 KiB."""
    with pytest.raises(RequestValidationError, match="max_response_bytes"):
        Transport(None, max_response_bytes=value)


async def test_read_timeout_names_host_and_relative_path(transport: Transport) -> None:
    """A read timeout names the server and the path relative to the base URL."""

    answer = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        # No answer until the client has timed out (5 s at most: a client that never
        # times out gets this answer, and the test fails instead of hanging).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(answer.wait(), 5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/x", slow)
    async with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with pytest.raises(APITimeoutError) as info:
            await get(transport, base, deadline=0.2)
        answer.set()  # the server's shutdown need not wait out a sleep
    assert str(info.value) == f"GET /x: timed out waiting for the response from 127.0.0.1:{port}"
    assert info.value.request_sent is True


async def test_a_header_aiohttp_refuses_counts_as_possibly_sent(transport: Transport) -> None:
    """A header value aiohttp refuses (a newline) is an APIConnectionError marked as
    possibly sent (the safe reading), its value redacted."""
    async with serve(app_answering("identity", b"{}")) as base:
        with pytest.raises(APIConnectionError) as info:
            await transport.send(
                "POST",
                base + "/v1/x",
                headers={"X-Violet-Token": "tok\r\nX-Evil: 1"},
                body=b"{}",
                timeouts=Timeouts(),
            )
    assert info.value.request_sent is True
    assert info.value.error_type == "ValueError"
    assert "tok\r\n" not in str(info.value)


def test_redactor_forms_and_edge_cases() -> None:
    """The redactor hides raw, JSON-escaped and URL-encoded forms, ignores empty
    secrets, leaves text alone when it knows none, and keeps non-UTF-8 bytes."""
    secret = 'p/"é x'
    redactor = Redactor(lambda: [secret, None, ""])
    assert redactor.text('a p/"é x b') == f"a {REDACTED} b"
    assert redactor.text('"p/\\"\\u00e9 x"') == f'"{REDACTED}"'
    assert redactor.text("p%2F%22%C3%A9%20x") == REDACTED
    assert redactor.text("p%2F%22%C3%A9+x") == REDACTED
    assert redactor.text("p/%22%c3%a9%20x") == REDACTED
    assert redactor.bytes(b"\xff" + secret.encode()) == b"\xff" + REDACTED.encode()
    assert redactor.bytes(b"") == b""
    assert Redactor().text(secret) == secret
    assert Redactor().bytes(b"x") == b"x"
    assert Redactor().headers({"a": "b"}) == {"a": "b"}
    assert Redactor().with_secrets("abc").text("xabcx") == f"x{REDACTED}x"
    assert repr(redactor) == "<Redactor>"
    assert has_control_character("a\tb")
    assert not has_control_character("a b")
