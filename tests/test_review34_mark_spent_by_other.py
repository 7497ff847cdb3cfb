"""Review 34: a bag's read-first mark spent by another caller's identical ask begun
after the cut left the cut call's repeat unread (failed on main 90e7304 and on branch
review34). An unkeyed client cannot tell the cut call's repeat from another caller's
identical ask begun after the cut, so a mark spent by the first ask of the request
begun after it was spent by the wrong one whenever two such asks came. Now the mark
is not spent by a read: every ask on the bag reads first until a refund made by the
time of the cut is older than any window a new send opens.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

from aiohttp import web

from violet_async import OrderRefund, VioletError
from violet_async.testing import FakeClock

from .conftest import serve
from .test_review34_findings import BAG_ID, ORDER_ID, VIOLET_500, _client


class PartBag:
    """One bag. Refund POST 1: 429 (``Retry-After: 10``); POST 2: applies, 200; later
    POSTs: Violet's own 500, nothing applied. ``Date`` on every answer."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0
        self.reads: list[float] = []

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

    def add(self, amount: int) -> dict[str, Any]:
        made = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        record = {
            "id": 800 + len(self.refunds),
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
        body = await request.json()
        if self.posts == 1:
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "10"}
            )
        if self.posts == 2:
            return web.json_response(self.add(body["amount_refunded"]))
        return web.json_response(VIOLET_500, status=500)

    async def listed(self, request: web.Request) -> web.Response:
        self.reads.append(self.clock.monotonic())
        return web.json_response(self.refunds)


async def test_another_callers_ask_begun_after_the_cut_leaves_the_repeat_unread() -> None:
    """Review 33's story with the other caller begun after the cut, not before.

    Call A asks 500 of the bag; its POST is answered 429 (``Retry-After: 10``). 9.5 s
    into the wait another system refunds 500 (refund 800). A's caller cuts A at 9.8 s
    (nothing applied): the bag is marked for A's request. At 9.8 s, right after the
    cut, another caller D (a second worker handling the same job) asks the same 500:
    begun after the mark, it reads the bag (800 in its baseline), spends the mark, and
    is refunded (POST 2, refund 801). A's caller repeats A: no mark, no read before its
    send; its POST is answered with Violet's own 500 (nothing applied), and its
    read-back took refund 800, made by the other system 0.3 s before the repeat's send,
    as the repeat's own: "refunded", for a refund this ask never made."""
    clock = FakeClock()
    bag = PartBag(clock)
    async with serve(bag.app()) as url, _client(url, clock) as client:
        clock.call_later(9.5, lambda: bag.add(500))
        a = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500))
        clock.call_later(9.8, a.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await a
        got_d = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500)
        assert got_d.id == 801, "D's own refund"
        try:
            got: OrderRefund | VioletError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=500
            )
        except VioletError as exc:
            got = exc
    assert bag.posts == 3, "the repeat's POST, answered 500: nothing applied"
    assert [r["id"] for r in bag.refunds] == [800, 801], "the other system's, then D's"
    assert not (isinstance(got, OrderRefund) and got.id == 800), (
        "another system's refund handed over as the repeat's own"
    )
