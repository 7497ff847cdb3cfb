"""The only module that imports aiohttp's client: send one request, return the raw
response, and turn every aiohttp failure into an SDK error that says whether the
request may have reached the server (the fact retry safety rests on).

Hostile answers are bounded here: a body is read in chunks and decompressed by this
module (never by aiohttp, whose older releases inflate a whole received chunk at once),
and reading stops at ``max_response_bytes`` of *decoded* body. aiohttp exceptions are
never chained onto the SDK's (their ``request_info`` holds the request headers, app
secret and token included): their facts are copied into the error instead, redacted.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import zlib
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, NoReturn

import aiohttp
import attrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._redact import Redactor
from ._version import __version__
from .exceptions import (
    APIConnectionError,
    APITimeoutError,
    ClientClosedError,
    RequestValidationError,
    ResponseFormatError,
    ResponseTooLargeError,
    VioletError,
)

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "USER_AGENT",
    "BaseURL",
    "RawResponse",
    "Timeouts",
    "Transport",
    "frozen_headers",
]

USER_AGENT = f"violet-async/{__version__}"

#: The largest response body read, counted after decompression: 4 MiB. A refund, a
#: cancel or an order with its bags is a few KiB; a list of refunds stays far below.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: How much of an over-large body an error keeps (``ResponseTooLargeError.body``).
BODY_PREFIX_BYTES = 1024
#: Only the encodings this module decodes itself are asked for.
ACCEPT_ENCODING = "gzip, deflate"
_CHUNK = 64 * 1024
#: Request headers whose values are secrets, redacted from any error about the request.
_SECRET_HEADERS = (
    "X-Violet-App-Secret",
    "X-Violet-Token",
    "Authorization",
    "Proxy-Authorization",
)


class RequestLeft:
    """Set (``left``) once a request's connection is handed over, its headers written
    on it at once: from then on it may reach Violet whatever the caller does (a
    cancellation included). A caller's own session (``session=``) marks nothing: its
    POSTs are never kept past a cancellation (``_requests._kept``)."""

    left = False  # a class default: made with no __init__ call


#: The :class:`RequestLeft` of the exchange running in this context (None: nobody asks).
REQUEST_LEFT: ContextVar[RequestLeft | None] = ContextVar("violet_request_left", default=None)


class _MarkingConnector(aiohttp.TCPConnector):
    """A connector that marks the running exchange's :class:`RequestLeft` as its
    connection is handed over: aiohttp writes the request's headers on it in the same
    step, with nothing awaited in between (an aiohttp trace for the headers cost about
    20 µs on every request; this, about one)."""

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,
    ) -> Any:
        conn = await super().connect(req, traces, timeout)
        mark = REQUEST_LEFT.get()
        if mark is not None:
            mark.left = True
        return conn


@attrs.frozen
class Timeouts:
    """Per-attempt timeouts, in seconds. The per-call deadline lives on RetryPolicy.

    ``connect`` covers waiting for a pooled connection and the TCP/TLS handshake; a
    request that times out there never reached Violet and is safe to retry. ``read``
    is the time Violet's answer gets once the request is on its way: one attempt lasts
    at most ``connect + read`` seconds (and never past the call's deadline), so the
    answer always has at least ``read`` seconds, and a body trickled out slowly cannot
    hold an attempt open however it is paced.
    """

    connect: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """Time to obtain a connection. Default 5 s."""
    read: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    """Time for the whole answer. Default 30 s (refunds call the merchant's
    platform, which can be slow)."""


class BaseURL:
    """The API's base URL, parsed once. :meth:`join` appends one of the SDK's own paths
    (fixed ASCII segments and validated integer ids) as already encoded, so aiohttp
    neither re-parses nor re-encodes the whole URL on every request (about 2 µs each).
    """

    __slots__ = ("_origin", "_prefix")

    def __init__(self, base_url: str) -> None:
        self._origin = URL(base_url)
        self._prefix = self._origin.raw_path.rstrip("/")

    def join(self, path: str) -> URL:
        return self._origin.with_path(self._prefix + path, encoded=True)


def frozen_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` as a read-only multidict: aiohttp takes that as it is, where a plain
    dict is first copied into a new multidict on every request (about 0.6 µs).

    ``Accept-Encoding`` is set to the encodings the transport decodes itself unless the
    caller chose one: aiohttp would otherwise advertise brotli or zstd when installed.
    """
    merged = CIMultiDict(headers)
    if "Accept-Encoding" not in merged:
        merged["Accept-Encoding"] = ACCEPT_ENCODING
    return CIMultiDictProxy(merged)


class RawResponse:
    """What came back: status, headers, and the whole body. (A slotted class rather
    than attrs: one is built per request, on the hot path.)"""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def redacted_response(resp: RawResponse, redactor: Redactor) -> RawResponse:
    """A copy of ``resp`` whose headers and body hide the client's secrets (what
    ``capture_responses`` keeps: a gateway page may echo the request)."""
    headers = CIMultiDictProxy(CIMultiDict(redactor.headers(resp.headers)))
    return RawResponse(resp.status, headers, redactor.bytes(resp.body))


# Raised before any byte of the request could reach the server.
_NEVER_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # refused, DNS, TLS handshake
    aiohttp.ConnectionTimeoutError,  # pool wait or connect timeout
    aiohttp.InvalidURL,
    # The proxy answered the CONNECT with another status than 200 (407: its user or
    # password is wrong; 403, 502): the tunnel never opened, nothing reached Violet.
    aiohttp.ClientHttpProxyError,
)


class Transport:
    """Owns (or borrows) one aiohttp session; sends requests with redirects off.

    ``max_response_bytes`` caps every response body, decompressed size included
    (default :data:`DEFAULT_MAX_RESPONSE_BYTES`, 4 MiB); a larger one raises
    :class:`ResponseTooLargeError` after reading no more than the cap. ``base_url``
    makes error paths relative to it (``/orders/1``, not ``/v1/orders/1``).
    ``redactor`` hides the client's secrets in anything an error keeps; the secret
    request headers of the failed request are always hidden. ``mark_sent``: the
    session it makes marks the running exchange's :class:`RequestLeft` as a request's
    connection is handed over (a client with ``keep_cancelled_sends``); off, a plain
    ``aiohttp.TCPConnector``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        *,
        connector_limit: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        base_url: str | None = None,
        redactor: Redactor | None = None,
        proxy: str | None = None,
        mark_sent: bool = False,
    ) -> None:
        if (
            not isinstance(max_response_bytes, int)
            or isinstance(max_response_bytes, bool)
            or max_response_bytes < BODY_PREFIX_BYTES
        ):
            raise RequestValidationError(
                "max_response_bytes", f"must be an int >= {BODY_PREFIX_BYTES}"
            )
        self._session = session
        self._owns_session = session is None
        self._connector_limit = connector_limit
        self._connector = _MarkingConnector if mark_sent else aiohttp.TCPConnector
        self._max_response_bytes = max_response_bytes
        self._base_path = URL(base_url).raw_path.rstrip("/") if base_url else ""
        self._redactor = redactor if redactor is not None else Redactor()
        self._proxy, self._proxy_headers, password = _proxy_parts(proxy)
        if password:  # the proxy's password is a secret too
            self._redactor = self._redactor.with_secrets(password)
        # Through a proxy, an https request carries the proxy's credentials on its
        # CONNECT; a plain-http one (a loopback fake) must carry them itself.
        self._plain_proxy_headers = (
            self._proxy_headers if base_url is not None and base_url.startswith("http:") else None
        )
        self._closed = False
        # (timeouts, deadline, the aiohttp timeout for them); the placeholder never matches.
        self._last_timeout: tuple[object, float | None, aiohttp.ClientTimeout] = (
            None,
            None,
            aiohttp.ClientTimeout(),
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Transport {state} max_response_bytes={self._max_response_bytes}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_response_bytes(self) -> int:
        return self._max_response_bytes

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this VioletClient is closed; create a new one")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=self._connector(limit=self._connector_limit),
                # Never read proxy settings or .netrc from the environment: credentials
                # must only go where the caller pointed the client.
                trust_env=False,
                json_serialize=None,  # type: ignore[arg-type]
            )
        return self._session

    async def open(self) -> None:
        self._open_session()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def send(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeouts: Timeouts,
        deadline: float | None = None,
    ) -> RawResponse:
        """Send one request. ``deadline`` (seconds left in the call) caps the attempt."""
        session = self._open_session()
        last = self._last_timeout
        if last[0] is timeouts and last[1] == deadline:
            # The common case: a first attempt's deadline is the policy's whole
            # deadline, the same every call; no cache key to build.
            timeout = last[2]
        else:
            timeout = _client_timeout(timeouts, deadline)
            self._last_timeout = (timeouts, deadline, timeout)
        if "Accept-Encoding" not in headers:
            headers = frozen_headers(headers)
        if self._plain_proxy_headers is not None:
            headers = frozen_headers({**headers, **self._plain_proxy_headers})
        # Built inside the handlers, raised after them: an exception raised inside an
        # ``except`` block would keep aiohttp's as ``__context__``, headers and all.
        failure: VioletError
        # The status of an answer whose body then could not be read (None: none such).
        answered: int | None = None
        try:
            # Awaited rather than entered: aiohttp's context managers add four coroutines
            # per request; release() below is what their exit does, bar waiting for a
            # body writer that finished before the answer came.
            response = await session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                auto_decompress=False,
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            )
            try:
                if (
                    "Content-Encoding" not in response.headers
                    and (length := response.content_length) is not None
                    and length <= self._max_response_bytes
                ):
                    # The common case: aiohttp stops reading at Content-Length.
                    payload = await response.read()
                else:
                    payload = await self._read_bounded(response, method, url, headers)
            except BaseException:
                response.close()  # never hand a half-read connection back to the pool
                answered = response.status
                raise
            response.release()
            return RawResponse(response.status, response.headers, payload)
        except VioletError:
            raise
        except _NEVER_SENT as exc:
            failure = self._connection_error(exc, method, url, headers, sent=False)
        except asyncio.TimeoutError:
            # A read timeout or the call deadline: the request may well have arrived.
            host, port = _host_port(url)
            path = self._path_of(url)
            failure = APITimeoutError(
                f"{method} {path}: timed out waiting for the response from {host}:{port}",
                method=method,
                path=path,
                request_sent=True,
                host=host,
                port=port,
                reason="timed out",
                error_type="TimeoutError",
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: aiohttp refused a header value (a newline) or choked on the
            # answer. Which one cannot be told apart here, so it counts as sent: the
            # safe reading for a refund.
            failure = self._connection_error(exc, method, url, headers, sent=True)
        except RuntimeError:
            # aiohttp raises RuntimeError("Session is closed") for a caller's session
            # closed under us.
            failure = ClientClosedError(
                f"{method} {self._path_of(url)}: the aiohttp session is closed"
            )
        _raise_unchained(self._cut_short(answered, failure, method, url))
        raise AssertionError("unreachable")  # for linters: the line above raises

    def _path_of(self, url: str | URL) -> str:
        """The path relative to the base URL, as the client names it (``/login``)."""
        path = _path_of(url)
        prefix = self._base_path
        if prefix and path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("/", ""):
            path = path[len(prefix) :] or "/"
        return path

    def _redactor_for(self, headers: Mapping[str, str]) -> Redactor:
        return self._redactor.with_secrets(*(headers.get(name) for name in _SECRET_HEADERS))

    def _connection_error(
        self,
        exc: BaseException,
        method: str,
        url: str | URL,
        headers: Mapping[str, str],
        *,
        sent: bool,
    ) -> APIConnectionError:
        host, port = _host_port(url)
        reason, errno = _reason_of(exc)
        reason = self._redactor_for(headers).text(reason)
        path = self._path_of(url)
        where = f"{host}:{port}" if host else "the server"
        if sent:
            message = f"{method} {path}: connection to {where} failed after sending ({reason})"
        else:
            message = f"{method} {path}: cannot connect to {where} ({reason})"
        cls = APITimeoutError if isinstance(exc, asyncio.TimeoutError) else APIConnectionError
        return cls(
            message,
            method=method,
            path=path,
            request_sent=sent,
            host=host,
            port=port,
            reason=reason,
            errno=errno,
            error_type=type(exc).__name__,
        )

    async def _read_bounded(
        self,
        response: aiohttp.ClientResponse,
        method: str,
        url: str | URL,
        headers: Mapping[str, str],
    ) -> bytes:
        """The body, decoded, read in chunks and never past ``max_response_bytes``."""
        limit = self._max_response_bytes
        status = response.status
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        decoder: _Decoder | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            decoder = _Decoder(encoding)
        elif encoding not in ("", "identity"):
            problem = (
                f"unsupported Content-Encoding {encoding[:40]!r} (asked for {ACCEPT_ENCODING})"
            )
            raise self._format_error(self._redactor_for(headers).text(problem), status, method, url)
        length = response.content_length
        content = response.content
        buffer = bytearray()
        if decoder is None and length is not None and length > limit:
            # Declared too large: keep a prefix for the error and read nothing more.
            while len(buffer) < BODY_PREFIX_BYTES:
                chunk = await content.read(BODY_PREFIX_BYTES - len(buffer))
                if not chunk:
                    break
                buffer += chunk
            raise self._too_large(
                buffer, status, method, url, headers=headers, detail=f"Content-Length {length}"
            )
        # Compressed input is allowed a little more than the cap (incompressible data
        # grows slightly); beyond that, empty gzip members could stream forever.
        raw_limit = limit + limit // 16 + _CHUNK
        raw_total = 0
        while True:
            chunk = await content.read(_CHUNK)
            if not chunk:
                break
            raw_total += len(chunk)
            if decoder is not None:
                if raw_total > raw_limit:
                    raise self._too_large(
                        buffer,
                        status,
                        method,
                        url,
                        headers=headers,
                        detail="compressed body too long",
                    )
                decoded = decoder.feed(chunk, limit - len(buffer) + 1)
                if decoded is None:
                    raise self._format_error(
                        f"the {encoding} body cannot be decoded", status, method, url
                    )
                chunk = decoded
            buffer += chunk
            if len(buffer) > limit:
                detail = f"more than {limit} bytes" + (
                    f" after {encoding} decompression" if decoder is not None else ""
                )
                raise self._too_large(buffer, status, method, url, headers=headers, detail=detail)
        if decoder is not None and not decoder.complete:
            raise self._format_error(f"the {encoding} body ended early", status, method, url)
        return bytes(buffer)

    def _cut_short(
        self, status: int | None, failure: VioletError, method: str, url: str | URL
    ) -> VioletError:
        """``failure``, or, for a 2xx answer to a POST whose body could not be read to
        its end (``status``: the connection reset or timed out mid-body), an unreadable
        2xx: its status line proves the request applied (review 20: taken for no
        answer, it was sent again once the list lagged past the settle window)."""
        if status is None or method == "GET" or not 200 <= status < 300:
            return failure
        if isinstance(failure, APIConnectionError):
            reason = failure.reason or type(failure).__name__
        else:
            reason = type(failure).__name__
        error = self._format_error(
            f"the {status} answer's body was cut short ({reason}): it applied, but what "
            "it made cannot be read",
            status,
            method,
            url,
        )
        error._unanswered = failure  # a login's is no answer: sent again (_requests)
        return error

    def _format_error(
        self, problem: str, status: int, method: str, url: str | URL
    ) -> ResponseFormatError:
        path = self._path_of(url)
        return ResponseFormatError(
            f"{method} {path}: {problem}", body=b"", status=status, method=method, path=path
        )

    def _too_large(
        self,
        buffer: bytearray,
        status: int,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        detail: str,
    ) -> ResponseTooLargeError:
        path = self._path_of(url)
        limit = self._max_response_bytes
        return ResponseTooLargeError(
            f"{method} {path}: response too large (HTTP {status}, {detail}; "
            f"max_response_bytes={limit})",
            # Redacted before the cut, and a tail that starts a secret dropped.
            body=self._redactor_for(headers)
            .preview(bytes(buffer), BODY_PREFIX_BYTES)
            .encode()[:BODY_PREFIX_BYTES],
            status=status,
            limit=limit,
            method=method,
            path=path,
        )


class _Decoder:
    """gzip (several members allowed) or deflate (zlib-wrapped or raw), decoded with a
    bound on the output of every call, so a bomb never inflates past the cap."""

    __slots__ = ("_deflate", "_obj", "complete")

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS) if not self._deflate else None
        self.complete = False

    def feed(self, data: bytes, max_out: int) -> bytes | None:
        """Decode ``data``, returning at most ``max_out`` bytes (None when it is not
        valid). Output beyond ``max_out`` is left undecoded: the caller stops anyway,
        as ``max_out`` is one past its cap."""
        try:
            if self._obj is None:
                # RFC 1950 header (CM = 8) or a bare RFC 1951 stream, as servers send both.
                wbits = zlib.MAX_WBITS if data[0] & 0x0F == 8 else -zlib.MAX_WBITS
                self._obj = zlib.decompressobj(wbits)
            out = self._obj.decompress(data, max_out)
            while self._obj.eof and not self._deflate:
                rest = self._obj.unused_data
                if not rest or len(out) >= max_out:
                    break
                self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next gzip member
                out += self._obj.decompress(rest, max_out - len(out))
        except zlib.error:
            return None
        self.complete = self._obj.eof
        return out


def _host_port(url: str | URL) -> tuple[str | None, int | None]:
    parsed = url if isinstance(url, URL) else URL(url)
    return parsed.raw_host, parsed.port


def _reason_of(exc: BaseException) -> tuple[str, int | None]:
    """What went wrong, in words, and the OS error number when there is one."""
    os_error = getattr(exc, "os_error", None)
    error = os_error if isinstance(os_error, OSError) else exc
    if isinstance(error, OSError) and not isinstance(error, asyncio.TimeoutError):
        errno = error.errno
        if isinstance(error, socket.gaierror) or isinstance(
            exc, getattr(aiohttp, "ClientConnectorDNSError", ())
        ):
            text = error.strerror or str(error)
            return f"DNS lookup failed: {text}", errno
        if errno is not None and errno > 0:
            return os.strerror(errno).lower(), errno
        if error.strerror:
            return error.strerror, errno
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy refused the tunnel: {exc.status} {exc.message}", None
    if isinstance(exc, aiohttp.ClientResponseError):
        # Its str() names the URL; the message is the parser's complaint.
        text = f"invalid response: {exc.message}"
    elif isinstance(exc, asyncio.TimeoutError):
        text = "timed out"
    else:
        text = str(exc) or type(exc).__name__
    # Parser complaints span lines; a message is one line.
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300], None


def check_proxy(proxy: object) -> str | None:
    """``proxy=``: None, or an ``http://`` URL (``http://user:password@host:port``); the
    request to Violet stays https inside the proxy's tunnel."""
    if proxy is None:
        return None
    if not isinstance(proxy, str):
        raise RequestValidationError("proxy", f"must be a str URL, got {type(proxy).__name__}")
    try:
        url = URL(proxy)
    except ValueError:
        raise RequestValidationError("proxy", "is not a URL") from None
    if url.scheme != "http" or not url.host:
        raise RequestValidationError(
            "proxy", "must be an http:// URL such as http://proxy.example:3128"
        )
    if url.query_string or url.fragment:
        raise RequestValidationError("proxy", "must not carry a query or fragment")
    return proxy


def _proxy_parts(
    proxy: str | None,
) -> tuple[URL | None, Mapping[str, str] | None, str | None]:
    """The proxy's URL without credentials, the Proxy-Authorization header its
    credentials make, and its password (to redact)."""
    if proxy is None:
        return None, None, None
    check_proxy(proxy)
    url = URL(proxy)
    if url.user is None:
        return url, None, None
    password = url.password or ""
    token = base64.b64encode(f"{url.user}:{password}".encode()).decode("ascii")
    return url.with_user(None), {"Proxy-Authorization": f"Basic {token}"}, password


def _client_timeout(timeouts: Timeouts, deadline: float | None) -> aiohttp.ClientTimeout:
    # One timer for the whole attempt rather than aiohttp's sock_read, which re-arms a
    # timer on every chunk received (about 5 µs a call) and still lets a body that
    # trickles in just under it run on until the deadline.
    attempt = timeouts.connect + timeouts.read
    total = attempt if deadline is None else min(deadline, attempt)
    return aiohttp.ClientTimeout(total=total, connect=timeouts.connect)


def _path_of(url: str | URL) -> str:
    if isinstance(url, URL):
        return url.raw_path
    scheme_end = url.find("://")
    slash = url.find("/", scheme_end + 3 if scheme_end >= 0 else 0)
    return url[slash:] if slash >= 0 else "/"


def _raise_unchained(failure: VioletError) -> NoReturn:
    """Raise ``failure`` with no ``__context__``: Python 3.10 may still see aiohttp's
    parser error as being handled here (a task resumed by throwing into it) and would
    chain it, headers and all."""
    try:
        raise failure
    finally:
        failure.__context__ = None
