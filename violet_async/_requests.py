"""How the client makes one request: a token (logging in or renewing when needed), one
attempt through the transport, one renewal on Violet's "Token has expired", errors
typed and redacted; reads retried on transient failures within a deadline, every page
followed; and the I/O the refund protocol's driver needs. ``VioletClient`` inherits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TypeVar

import attrs

from ._auth import Auth, Credentials, is_token_expired_error
from ._reconcile import BagIO, BagLocks, KnownRefunds
from ._responses import RefundPage, parse_order, parse_refund_page
from ._retry import Clock, Retrier, RetryHook, RetryPolicy
from ._transport import BaseURL, RawResponse, Timeouts, Transport, frozen_headers
from .exceptions import (
    APITimeoutError,
    AuthenticationError,
    VioletError,
    api_error_from_response,
)
from .models import Order, OrderRefund
from .models._validators import check_id

__all__ = ["RequestPlumbing", "Shared"]

T = TypeVar("T")


@attrs.define(repr=False)  # its headers hold the app secret and the token
class Shared:
    """State shared by a client and the clients ``with_options`` derives from it."""

    base_url: str
    endpoint: BaseURL
    transport: Transport
    auth: Auth
    credentials: Credentials
    headers: dict[str, str]
    known_refunds: KnownRefunds
    clock: Clock
    bag_locks: BagLocks = attrs.Factory(BagLocks)
    _token_headers: tuple[str, Mapping[str, str]] | None = None

    def headers_for(self, token: str) -> Mapping[str, str]:
        """The request headers with ``token``, built once per token."""
        cached = self._token_headers
        if cached is None or cached[0] != token:
            headers = frozen_headers({**self.headers, "X-Violet-Token": token})
            cached = self._token_headers = (token, headers)
        return cached[1]


class RequestPlumbing:
    """The request layer of a client; ``with_options`` clones share ``_shared`` and
    carry their own policy, timeouts and hook."""

    _shared: Shared
    _retry: RetryPolicy
    _timeouts: Timeouts
    _on_retry: RetryHook | None
    _retrier_cache: Retrier | None

    def _bag_io(
        self,
        order_id: int,
        bag_id: int,
        path: str,
        body: bytes,
        parse: Callable[[RawResponse, str], OrderRefund],
    ) -> BagIO:
        """What the refund protocol's driver needs for one ask (built after a failure,
        or for an ask that reads before sending)."""
        return BagIO(
            send_once=partial(self._attempt, "POST", path, body, parse),
            read_refunds=partial(self._read_refunds, self._bag_path(order_id, bag_id, "refunds")),
            read_order=partial(self._read_order, order_id),
            bag_id=bag_id,
            path=path,
            policy=self._retry,
            on_retry=self._on_retry,
        )

    async def _read_order(self, order_id: int, deadline: float | None) -> Order:
        return await self._get(f"/orders/{order_id}", parse_order, deadline=deadline)

    def _bag_path(self, order_id: int, bag_id: int, action: str) -> str:
        check_id("order_id", order_id)
        check_id("bag_id", bag_id)
        return f"/orders/{order_id}/bags/{bag_id}/{action}"

    def _deadline(self) -> float | None:
        """This call's deadline on the monotonic clock."""
        if self._retry.deadline is None:
            return None
        return self._shared.clock.monotonic() + self._retry.deadline

    def _retrier(self) -> Retrier:
        # One per client (its settings are fixed), built on first use.
        retrier = self._retrier_cache
        if retrier is None:
            retrier = self._retrier_cache = Retrier(self._retry, self._shared.clock, self._on_retry)
        return retrier

    async def _get(
        self,
        path: str,
        parse: Callable[[RawResponse, str], T],
        *,
        deadline: float | None = None,
        query: Mapping[str, str] | None = None,
    ) -> T:
        """A read, retried on every transient failure until ``deadline`` (monotonic;
        default: the policy's from now). First attempt inline."""
        clock = self._shared.clock
        if deadline is None:
            deadline = self._deadline()
        send = partial(self._attempt, "GET", path, None, parse, query=query)
        remaining = None if deadline is None else deadline - clock.monotonic()
        try:
            return await send(remaining)
        except VioletError as exc:
            return await self._retrier().after_first_failure(
                exc, send, deadline=deadline, method="GET", path=path
            )

    async def _read_refunds(self, path: str, deadline: float | None) -> RefundPage:
        """Every page of a bag's refunds, as one page. A page that cannot be followed
        fails the whole read: part of a list is never taken for all of it."""
        page = await self._get(path, parse_refund_page, deadline=deadline)
        refunds = page.refunds
        seen = 1
        while page.next_page is not None:
            query = {"page": str(page.next_page)}
            if page.size is not None:
                query["size"] = str(page.size)
            page = await self._get(path, parse_refund_page, deadline=deadline, query=query)
            refunds = refunds + page.refunds
            seen += 1
        return RefundPage(refunds, None, None, page.server_time)

    async def _attempt(
        self,
        method: str,
        path: str,
        body: bytes | None,
        parse: Callable[[RawResponse, str], T],
        remaining: float | None,
        *,
        query: Mapping[str, str] | None = None,
    ) -> T:
        """One attempt: token, send, one renewal on an expired token, status check,
        parse. ``remaining`` is what is left of the call's deadline."""
        shared = self._shared
        if remaining is not None and remaining <= 0:
            raise APITimeoutError(
                f"{method} {path}: the call's deadline passed before sending",
                method=method,
                path=path,
                request_sent=False,
            )
        token = shared.auth.current()
        if token is None:
            token = await self._token(shared.auth.token(), remaining)
        url = shared.endpoint.join(path)
        if query:
            url = url.with_query(query)
        resp = await shared.transport.send(
            method,
            url,
            headers=shared.headers_for(token),
            body=body,
            timeouts=self._timeouts,
            deadline=remaining,
        )
        if resp.status == 401:
            error = api_error_from_response(
                resp.status,
                resp.body,
                resp.headers,
                method=method,
                path=path,
                redact=shared.auth.redactor,
            )
            if not is_token_expired_error(error):
                raise error
            # Violet rejected the token before doing anything: renewing and sending
            # again cannot apply the request twice.
            token = await self._token(shared.auth.expired(token), remaining)
            resp = await shared.transport.send(
                method,
                url,
                headers=shared.headers_for(token),
                body=body,
                timeouts=self._timeouts,
                deadline=remaining,
            )
        if not 200 <= resp.status < 300:
            raise api_error_from_response(
                resp.status,
                resp.body,
                resp.headers,
                method=method,
                path=path,
                redact=shared.auth.redactor,
            )
        return parse(resp, path)

    @staticmethod
    async def _token(renewal: Awaitable[str], remaining: float | None) -> str:
        """Await a token within what is left of the call's deadline; a failure to get
        one was already retried by the auth step."""
        try:
            if remaining is None:
                return await renewal
            return await asyncio.wait_for(renewal, max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise APITimeoutError(
                "the call's deadline passed while logging in; nothing was sent",
                request_sent=False,
            ) from None
        except VioletError as exc:
            exc._retries_spent = True
            raise

    async def _auth_send(
        self, method: str, path: str, body: bytes | None, token: str | None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        shared = self._shared
        headers = dict(shared.headers)
        if token is not None:
            headers["X-Violet-Token"] = token

        async def send(remaining: float | None) -> tuple[int, bytes, Mapping[str, str]]:
            resp = await shared.transport.send(
                method,
                shared.endpoint.join(path),
                headers=headers,
                body=body,
                timeouts=self._timeouts,
                deadline=remaining,
            )
            if not 200 <= resp.status < 300:
                error = api_error_from_response(
                    resp.status,
                    resp.body,
                    resp.headers,
                    method=method,
                    path=path,
                    redact=shared.auth.redactor,
                )
                if error.status in (400, 401, 403):
                    raise AuthenticationError(
                        error.message,
                        status=error.status,
                        error_code=error.error_code,
                        body=b"",  # a login answer is not kept: it may echo the user
                        headers=error.headers,
                        method=method,
                        path=path,
                    )
                raise error
            return resp.status, resp.body, resp.headers

        # Logging in or refreshing twice is harmless, so every transient failure retries.
        result: tuple[int, bytes, Mapping[str, str]] = await self._retrier().run(
            send, method=method, path=path
        )
        return result
