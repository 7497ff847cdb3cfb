"""Review 24: findings, each shown on a server scripted in its test.

Each test serves its own small Violet on 127.0.0.1 (port 0), on a FakeClock shared
with the client (its ``Date`` headers and refund dates read that clock), and counts
refunds by the server's own ledger."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async.testing import FakeClock

ORDER, BAG = 6101, 7101
OWN = 300


class ShiftingPages:
    """A bag's refund list, newest first, in pages of one (Spring's page shape); with
    ``cached``, the pages after the second are answered as they were first answered.

    The ask's POST commits its refund and answers 504; another system refunds the
    bag (another amount) right after. Reads of the list answer 503 until ``open``.
    In the first read after that, the list's last page is answered at once, and the
    page before it only after that: meanwhile two more refunds are made on the bag,
    which moves every refund one place further down the list than that last page
    showed (``shift``)."""

    def __init__(self, clock: FakeClock, *, shift: bool, cached: bool = False) -> None:
        self.clock = clock
        self.shift = shift
        self.cached = cached
        self.cache: dict[int, bytes] = {}
        self.ledger: list[dict[str, Any]] = []  # newest first, as listed
        self.posts = 0
        self.open = False
        self.last_answered = asyncio.Event()
        self.shifted = False
        self._id = 9000
        self._add(50, age=86_400.0)  # a refund of the day before

    def _add(self, amount: int, *, age: float = 0.0) -> dict[str, Any]:
        self._id += 1
        when = datetime.fromtimestamp(self.clock.time() - age, timezone.utc)
        record = {
            "id": self._id,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": amount,
            "status": "COMPLETED",
            "date_created": when.strftime("%Y-%m-%dT%H:%M:%S+0000"),
        }
        self.ledger.insert(0, record)
        return record

    @property
    def own_refunds(self) -> int:
        return sum(1 for r in self.ledger if r["amount"] == OWN)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._date])
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    @web.middleware
    async def _date(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = formatdate(self.clock.time(), usegmt=True)
        return response

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"token": "shift-access-token-0123456789", "refresh_token": "shift-refresh-0123456789"}
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        self._add(int(body["amount_refunded"]))
        self._add(111)  # another system's refund of the bag, right after
        return web.Response(status=504, body=b"<html>504 Gateway Time-out</html>")

    async def _order(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"id": ORDER, "bags": [{"id": BAG, "status": "COMPLETED", "total": 1000}]}
        )

    async def _list(self, request: web.Request) -> web.Response:
        if not self.open:
            return web.Response(status=503, body=b"upstream connect error")
        page = int(request.query.get("page", "0"))
        if self.shift and not self.shifted and page > 0:
            if page == 1:
                await self.last_answered.wait()
                self._add(120)
                self._add(130)
                self.shifted = True
            else:
                self.last_answered.set()
        if self.cached and page in self.cache:
            return web.Response(body=self.cache[page], content_type="application/json")
        records = list(self.ledger)
        pages = len(records)
        data = {
            "content": records[page : page + 1],
            "number": page,
            "size": 1,
            "total_pages": pages,
            "total_elements": pages,
            "last": page + 1 >= pages,
        }
        body = orjson.dumps(data)
        if page > 1:
            self.cache[page] = body
        return web.Response(body=body, content_type="application/json")


@contextlib.asynccontextmanager
async def _client(server: ShiftingPages, deadline: float = 20.0) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            10024,
            "shift-app-secret-0123456789",
            username="shift-user",
            password="shift-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            clock=server.clock,
            retry=RetryPolicy(max_attempts=4, deadline=deadline),
        ) as client:
            yield client
    finally:
        server.last_answered.set()
        await runner.cleanup()


@pytest.mark.parametrize("shift", [False, True])
async def test_a_page_read_ahead_before_the_list_moved_never_hides_a_refund(shift: bool) -> None:
    """A page asked for ahead answers from the list as it was before a page the walk
    takes before it: refunds made between the two moved every record down a place,
    so the one on the seam was on neither page, and the counts still added up (two
    new ones read for the one missed). The ask's own refund, missed, was proven
    absent and sent again: two refunds (``shift=False``: the same bag, read whole)."""
    clock = FakeClock()
    server = ShiftingPages(clock, shift=shift)
    async with _client(server, deadline=20.0) as client:
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await client.refund_bag(ORDER, BAG, amount_refunded=OWN)
        pending = caught.value.pending
        assert pending is not None
        assert server.posts == 1
        clock.advance(3600.0)  # long past every settle window
        server.open = True
        outcome: object
        try:
            outcome = await client.resume(pending)
        except VioletError as exc:
            outcome = exc
    assert server.own_refunds == 1, f"refunded twice ({outcome!r})"
    assert server.posts == 1
    assert isinstance(outcome, OrderRefund)
    assert (outcome.id, outcome.amount, outcome.reconciled) == (9002, OWN, True)


async def test_a_page_answered_from_an_older_list_fails_the_read() -> None:
    """The list's last page answered from an older copy of the list (a cache keyed by
    the page's URL, a replica behind), asked ahead or again: it counts fewer refunds
    than the page the walk took before it. A record the newer page moved onto it was
    on neither; the read fails (pending), never proves the ask absent."""
    clock = FakeClock()
    server = ShiftingPages(clock, shift=True, cached=True)
    async with _client(server) as client:
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await client.refund_bag(ORDER, BAG, amount_refunded=OWN)
        pending = caught.value.pending
        assert pending is not None
        clock.advance(3600.0)
        server.open = True
        with pytest.raises(AmbiguousOutcomeError) as again:
            await client.resume(pending)
    assert server.own_refunds == 1
    assert server.posts == 1
    assert "page 2 counts 3 refunds, the page before it 5" in str(again.value)
    assert again.value.pending is not None
    assert not again.value.pending.needs_review
