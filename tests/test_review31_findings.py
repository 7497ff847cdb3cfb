"""Review 31, on servers scripted here: a batch row whose read before its send is
answered 5xx; a call whose re-send after a 429's wait found the connection refused."""

from __future__ import annotations

import asyncio
import socket
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    APIError,
    OrderRefund,
    RateLimitError,
    RetryPolicy,
    VioletClient,
)
from violet_async.batch import BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

from .conftest import serve

ORDER_ID, BAG_ID = 31001, 31002


class Bag:
    """One bag of 1000: a POST refunds what it asks; the refund list answers
    ``failing`` (a status and a body) while it is set (every read: its own retries see
    the same)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.failing: tuple[int, bytes] | None = None
        self.posts = 0
        self.failed_reads = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self.login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self.refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self.listed)
        return app

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "review31-token-0123456789"})

    async def refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        made = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        record = {
            "id": 900 + len(self.refunds),
            "order_id": ORDER_ID,
            "bag_id": BAG_ID,
            "amount": body["amount_refunded"],
            "status": "COMPLETED",
            "date_created": made.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.refunds.append(record)
        return web.json_response(record)

    async def listed(self, request: web.Request) -> web.Response:
        if self.failing is not None:
            self.failed_reads += 1
            status, body = self.failing
            return web.Response(status=status, body=body, content_type="application/json")
        return web.json_response(self.refunds)


async def _run(url: str, clock: FakeClock, journal: Path) -> list[tuple[str, str | None]]:
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=500))
    policy = RetryPolicy(max_attempts=1, deadline=60.0)
    async with VioletClient(
        31,
        "review31-secret",
        token="review31-token-0123456789",
        base_url=url + "/v1",
        clock=clock,
        retry=policy,
    ) as client:
        results = run_batch(client, [item], journal=journal)
        return [(r.outcome, r.error_class) async for r in results]


VIOLET_500 = b'{"status": 500, "message": "Internal error", "error_code": 5000}'
GATEWAY_502 = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


@pytest.mark.parametrize(
    ("failing", "error"), [((500, VIOLET_500), "ServerError"), ((502, GATEWAY_502), "ServerError")]
)
async def test_a_5xx_to_the_read_before_a_rows_send_leaves_it_not_sent(
    tmp_path: Path, failing: tuple[int, bytes], error: str
) -> None:
    """The read of the bag before a row's first send (the baseline) answered 5xx after
    its retries: nothing was sent. The row ended ``failed`` (a definite failure: "fix
    the rows"), was journaled so, and the next run skipped it as ``already_failed``:
    the shopper was never refunded, and no run would send it without
    ``--retry-failed``. (A 429 there is ``not_sent`` since seed 1321726's fix.)"""
    clock = FakeClock()
    bag = Bag(clock)
    journal = tmp_path / "rows.journal.jsonl"
    async with serve(bag.app()) as url:
        bag.failing = failing
        first = await _run(url, clock, journal)
        assert bag.failed_reads >= 1
        assert bag.posts == 0
        assert first == [("not_sent", error)]
        bag.failing = None
        second = await _run(url, clock, journal)
    assert second == [("succeeded", None)]
    assert len(bag.refunds) == 1, "one refund, sent by the run after the 5xx"


class Gone:
    """One bag: the first POST is answered 429 (``Retry-After: 10``, the connection
    closed), then the server stops listening until ``back`` is called; every later POST
    is answered Violet's own 500 (nothing applied). ``Date`` on every answer."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0
        self.runner = web.AppRunner(self.app())
        self.port = 0
        self.site: web.TCPSite | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.dated])
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self.refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self.listed)
        return app

    @web.middleware
    async def dated(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = formatdate(self.clock.time(), usegmt=True)
        return response

    async def start(self) -> str:
        await self.runner.setup()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        await self.back()
        return f"http://127.0.0.1:{self.port}/v1"

    async def back(self) -> None:
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await self.site.start()

    async def gone(self) -> None:
        assert self.site is not None
        await self.site.stop()

    def add(self, amount: int) -> dict[str, Any]:
        """Another system's refund, made now."""
        made = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        record = {
            "id": 700 + len(self.refunds),
            "order_id": ORDER_ID,
            "bag_id": BAG_ID,
            "amount": amount,
            "status": "COMPLETED",
            "date_created": made.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.refunds.append(record)
        return record

    async def refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        await request.read()
        if self.posts == 1:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.gone()))
            headers = {"Retry-After": "10", "Connection": "close"}
            return web.json_response({"message": "Too many requests"}, status=429, headers=headers)
        error = {"status": 500, "message": "Internal error", "error_code": 5000}
        return web.json_response(error, status=500)

    async def listed(self, request: web.Request) -> web.Response:
        return web.json_response(self.refunds)


async def test_a_call_whose_resend_after_a_429_wait_found_no_connection_marks_its_bag() -> None:
    """A call's POST was answered 429 (wait 10 s); another system made an identical
    refund 9.5 s into the wait; the re-send after the wait found the connection refused
    and, out of attempts, the call raised APIConnectionError (nothing sent that could
    apply). Its caller repeated it at once: a new ask with no baseline, answered 500,
    whose read-back took the other system's refund for its own. A call ended by
    RateLimitError marks its bag so that its repeat reads the bag first (review 30);
    one ended otherwise after a 429's wait did not. (Since seed 5062095's fix the read
    before that re-send, refused too, keeps it from leaving: the call reads until its
    deadline and ends with its 429, RateLimitError, not sent; the bag is marked.)"""
    clock = FakeClock()
    server = Gone(clock)
    url = await server.start()
    other: list[dict[str, Any]] = []
    try:
        async with VioletClient(
            31,
            "review31-secret",
            token="review31-token-0123456789",
            base_url=url,
            clock=clock,
            retry=RetryPolicy(max_attempts=2, deadline=60.0),
        ) as client:
            clock.call_later(9.5, lambda: other.append(server.add(500)))
            with pytest.raises(RateLimitError):
                await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500)
            assert server.posts == 1
            assert len(other) == 1
            await server.back()
            try:
                got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=500
                )
            except AmbiguousOutcomeError as exc:
                got = exc
    finally:
        await server.runner.cleanup()
    assert server.posts == 2, "the repeat's POST, answered 500: nothing applied"
    assert not (isinstance(got, OrderRefund) and got.id == other[0]["id"]), (
        "another system's refund handed over as the repeat's own"
    )


class Refused(Gone):
    """The first POST answered 429 (wait 10 s), the second refused by Violet (a 400:
    nothing applied), any later one Violet's 500; the server stays up."""

    async def refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        await request.read()
        if self.posts == 1:
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "10"}
            )
        if self.posts == 2:
            error = {"status": 400, "message": "Bag cannot be refunded now", "error_code": 4006}
            return web.json_response(error, status=400)
        error = {"status": 500, "message": "Internal error", "error_code": 5000}
        return web.json_response(error, status=500)


async def test_a_call_whose_resend_after_a_429_wait_was_refused_marks_its_bag() -> None:
    """The same mark for a call ended by a 4xx after a 429's wait (review 31's "ended
    otherwise", kept covered since seed 5062095's fix keeps a re-send from leaving
    after a refused read): another system's identical refund 9.5 s into the wait, the
    re-send answered 400 (nothing applied), the caller's repeat at once answered 500.
    The repeat reads the bag first: the other refund is never its own."""
    clock = FakeClock()
    server = Refused(clock)
    url = await server.start()
    other: list[dict[str, Any]] = []
    try:
        async with VioletClient(
            31,
            "review31-secret",
            token="review31-token-0123456789",
            base_url=url,
            clock=clock,
            retry=RetryPolicy(max_attempts=2, deadline=60.0),
        ) as client:
            clock.call_later(9.5, lambda: other.append(server.add(500)))
            with pytest.raises(APIError) as caught:
                await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500)
            assert caught.value.status == 400
            assert server.posts == 2
            try:
                got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=500
                )
            except AmbiguousOutcomeError as exc:
                got = exc
    finally:
        await server.runner.cleanup()
    assert len(other) == 1
    assert server.posts == 3, "the repeat's POST, answered 500: nothing applied"
    assert not (isinstance(got, OrderRefund) and got.id == other[0]["id"]), (
        "another system's refund handed over as the repeat's own"
    )
