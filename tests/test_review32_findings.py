"""Review 32, on a server scripted here (127.0.0.1, port 0, on a FakeClock shared
with the client): a call whose re-send after a 429's wait was answered 2xx with a
refund that moved no money (FAILED), and its caller's repeat."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RefundFailedError,
    RetryPolicy,
    VioletClient,
)
from violet_async.testing import FakeClock

from .conftest import serve

ORDER_ID, BAG_ID = 32001, 32002


class Bag:
    """One bag: POST 1 is answered 429 (``Retry-After: 10``); POST 2 is answered 200
    with a refund whose status is ``second`` (FAILED: the gateway declined it, no money
    moved; it is listed so); every later POST is answered Violet's own 500 (nothing
    applied). ``Date`` on every answer."""

    def __init__(self, clock: FakeClock, second: str = "FAILED") -> None:
        self.clock = clock
        self.second = second
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

    def add(self, amount: int, status: str = "COMPLETED") -> dict[str, Any]:
        made = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        record = {
            "id": 800 + len(self.refunds),
            "order_id": ORDER_ID,
            "bag_id": BAG_ID,
            "amount": amount,
            "status": status,
            "date_created": made.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.refunds.append(record)
        return record

    @property
    def moved(self) -> list[dict[str, Any]]:
        """Refunds that moved money."""
        return [r for r in self.refunds if r["status"] not in ("FAILED", "CANCELED")]

    async def refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        if self.posts == 1:
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "10"}
            )
        if self.posts == 2:
            return web.json_response(self.add(body["amount_refunded"], self.second))
        error = {"status": 500, "message": "Internal error", "error_code": 5000}
        return web.json_response(error, status=500)

    async def listed(self, request: web.Request) -> web.Response:
        return web.json_response(self.refunds)


@pytest.mark.parametrize("second", ["FAILED", "CANCELED"])
async def test_a_call_ended_by_a_refund_that_moved_no_money_after_a_429_wait_marks_its_bag(
    second: str,
) -> None:
    """A call's POST was answered 429 (wait 10 s); another system made an identical
    refund 9.5 s into the wait; the re-send after the wait was answered 200 with a
    refund that moved no money, and the call raised RefundFailedError. Its caller
    repeated it at once: a new ask with no baseline, answered 500, whose read-back took
    the other system's refund for its own (reported applied: the shopper was never
    refunded by this ask). A call ended otherwise after a 429's wait marks its bag
    (review 31); this end (the refund's status read after the engine returned it)
    did not."""
    clock = FakeClock()
    bag = Bag(clock, second)
    other: list[dict[str, Any]] = []
    async with serve(bag.app()) as url:
        async with VioletClient(
            32,
            "review32-secret",
            token="review32-token-0123456789",
            base_url=url + "/v1",
            clock=clock,
            retry=RetryPolicy(max_attempts=2, deadline=60.0, jitter=False),
        ) as client:
            clock.call_later(9.5, lambda: other.append(bag.add(500)))
            with pytest.raises(RefundFailedError):
                await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500)
            assert bag.posts == 2
            assert len(other) == 1
            try:
                got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=500
                )
            except AmbiguousOutcomeError as exc:
                got = exc
    assert bag.posts == 3, "the repeat's POST, answered 500: nothing applied"
    assert bag.moved == other, "only the other system's refund moved money"
    assert not (isinstance(got, OrderRefund) and got.id == other[0]["id"]), (
        "another system's refund handed over as the repeat's own"
    )
