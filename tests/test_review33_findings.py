"""Review 33.

A bag's mark (``PendingAsks.cut_while_absent``: a call cut, or ended, during a 429's
wait) was spent by the first new ask of the same request that read the bag
(``PendingAsks.read_first``), whoever's it was. Another caller's identical ask that
waited for the bag during the cut call's wait spent it; the cut call's own repeat then
sent with no baseline and took another system's identical refund made in the wait for
its own (reported applied: the shopper was never refunded by that repeat). Now only an
ask begun after the mark spends it; one begun before reads the bag and leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

from aiohttp import web

from violet_async import OrderRefund, RetryPolicy, VioletClient, VioletError
from violet_async.testing import FakeClock

from .conftest import serve

ORDER_ID, BAG_ID = 33001, 33002


class Bag:
    """One bag. POST 1: 429 (``Retry-After: 10``); POST 2: applies, 200; later POSTs:
    Violet's own 500, nothing applied. ``Date`` on every answer."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0

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
        error = {"status": 500, "message": "Internal error", "error_code": 5000}
        return web.json_response(error, status=500)

    async def listed(self, request: web.Request) -> web.Response:
        return web.json_response(self.refunds)


async def test_a_mark_spent_by_another_callers_identical_ask_leaves_the_repeat_unread() -> None:
    """Call A's POST was answered 429 (wait 10 s); call B, asking the bag for the same
    money, waited for the bag meanwhile. Another system made an identical refund 9.5 s
    into the wait; A's caller cut A at 9.8 s (nothing of it applied): the bag is marked
    for A's request. B took the bag, spent the mark with its read (the other refund in
    B's baseline) and was refunded (POST 2). A's caller repeats A: no mark, no read,
    its POST answered 500 (nothing applied), and its read-back took the other system's
    refund, made 9.5 s into A's wait, for its own."""
    clock = FakeClock()
    bag = Bag(clock)
    other: list[dict[str, Any]] = []
    async with serve(bag.app()) as url:
        async with VioletClient(
            33,
            "review33-secret",
            token="review33-token-0123456789",
            base_url=url + "/v1",
            clock=clock,
            retry=RetryPolicy(max_attempts=2, deadline=60.0, jitter=False),
        ) as client:
            clock.call_later(9.5, lambda: other.append(bag.add(500)))
            a = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500))
            b = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500))
            clock.call_later(9.8, a.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await a
            got_b = await b
            assert bag.posts == 2
            assert got_b.id == 801, "B's own refund"
            try:
                got: OrderRefund | VioletError = await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=500
                )
            except VioletError as exc:
                got = exc
    assert bag.posts == 3, "the repeat's POST, answered 500: nothing applied"
    assert [r["id"] for r in bag.refunds] == [800, 801], "the other system's, then B's"
    assert not (isinstance(got, OrderRefund) and got.id == other[0]["id"]), (
        "another system's refund handed over as the repeat's own"
    )
