"""The only module that imports aiohttp's client: send one request, return the raw
response, and turn every aiohttp failure into an SDK error that says whether the
request may have reached the server (the fact retry safety rests on)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import attrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._version import __version__
from .exceptions import APIConnectionError, APITimeoutError, ClientClosedError

__all__ = ["USER_AGENT", "BaseURL", "RawResponse", "Timeouts", "Transport", "frozen_headers"]

USER_AGENT = f"violet-async/{__version__}"


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
    dict is first copied into a new multidict on every request (about 0.6 µs)."""
    return CIMultiDictProxy(CIMultiDict(headers))


class RawResponse:
    """What came back: status, headers, and the whole body. (A slotted class rather
    than attrs: one is built per request, on the hot path.)"""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


# Raised before any byte of the request could reach the server.
_NEVER_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # refused, DNS, TLS handshake
    aiohttp.ConnectionTimeoutError,  # pool wait or connect timeout
    aiohttp.InvalidURL,
)


class Transport:
    """Owns (or borrows) one aiohttp session; sends requests with redirects off."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        *,
        connector_limit: int = 100,
    ) -> None:
        self._session = session
        self._owns_session = session is None
        self._connector_limit = connector_limit
        self._closed = False
        # (timeouts, deadline, the aiohttp timeout for them); the placeholder never matches.
        self._last_timeout: tuple[object, float | None, aiohttp.ClientTimeout] = (
            None,
            None,
            aiohttp.ClientTimeout(),
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this VioletClient is closed; create a new one")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connector_limit),
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
            )
            try:
                payload = await response.read()
            finally:
                response.release()
            return RawResponse(response.status, response.headers, payload)
        except _NEVER_SENT as exc:
            cls = APITimeoutError if isinstance(exc, asyncio.TimeoutError) else APIConnectionError
            raise cls(
                f"{method} {_path_of(url)}: could not connect ({type(exc).__name__})",
                method=method,
                path=_path_of(url),
                request_sent=False,
            ) from exc
        except asyncio.TimeoutError as exc:
            # A read timeout or the call deadline: the request may well have arrived.
            raise APITimeoutError(
                f"{method} {_path_of(url)}: timed out waiting for the response",
                method=method,
                path=_path_of(url),
                request_sent=True,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise APIConnectionError(
                f"{method} {_path_of(url)}: connection failed after sending ({type(exc).__name__})",
                method=method,
                path=_path_of(url),
                request_sent=True,
            ) from exc
        except RuntimeError as exc:
            # aiohttp raises RuntimeError("Session is closed") for a caller's session
            # closed under us.
            raise ClientClosedError(
                f"{method} {_path_of(url)}: the aiohttp session is closed"
            ) from exc


def _client_timeout(timeouts: Timeouts, deadline: float | None) -> aiohttp.ClientTimeout:
    # One timer for the whole attempt rather than aiohttp's sock_read, which re-arms a
    # timer on every chunk received (about 5 µs a call) and still lets a body that
    # trickles in just under it run on until the deadline.
    attempt = timeouts.connect + timeouts.read
    total = attempt if deadline is None else min(deadline, attempt)
    return aiohttp.ClientTimeout(total=total, connect=timeouts.connect)


def _path_of(url: str | URL) -> str:
    # Errors name the path only: the host is configuration, not request context.
    if isinstance(url, URL):
        return url.raw_path
    scheme_end = url.find("://")
    slash = url.find("/", scheme_end + 3 if scheme_end >= 0 else 0)
    return url[slash:] if slash >= 0 else "/"
