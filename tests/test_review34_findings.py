"""Review 34: an outsider's attack on the SDK with hostile servers scripted here.

Each test tells its story in its docstring (as it went on main 90e7304, where each
failed). The read-first mark's holes are closed by a mark that holds for a time and is
never spent by a read (``PendingAsks.cut_while_absent``; tests/test_cut_in_429_wait.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

from aiohttp import web

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy, VioletClient, VioletError
from violet_async.testing import FakeClock

from .conftest import serve

ORDER_ID, BAG_ID = 34001, 34002
TOTAL = 5000

VIOLET_500 = {"status": 500, "message": "Internal error", "error_code": 5000}


class WholeBag:
    """One bag of ``TOTAL`` cents. Refund POST 1: 429 (``Retry-After: 10``); later refund
    POSTs: Violet's own 500, nothing applied. A cancel POST is refused (400: the bag is
    refunded). ``Date`` on every answer, from the shared fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts: list[str] = []
        self.status = "ACCEPTED"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.dated])
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self.refund)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self.cancel)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self.listed)
        app.router.add_get("/v1/orders/{o}", self.order)
        return app

    @web.middleware
    async def dated(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = formatdate(self.clock.time(), usegmt=True)
        return response

    def add(self, amount: int) -> dict[str, Any]:
        made = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        record = {
            "id": 900 + len(self.refunds),
            "order_id": ORDER_ID,
            "bag_id": BAG_ID,
            "amount": amount,
            "status": "COMPLETED",
            "date_created": made.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.refunds.append(record)
        self.status = "REFUNDED"
        return record

    async def refund(self, request: web.Request) -> web.Response:
        self.posts.append("refund")
        if self.posts.count("refund") == 1:
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "10"}
            )
        return web.json_response(VIOLET_500, status=500)

    async def cancel(self, request: web.Request) -> web.Response:
        self.posts.append("cancel")
        refused = {"status": 400, "message": "Bag cannot be cancelled", "error_code": 4010}
        return web.json_response(refused, status=400)

    async def listed(self, request: web.Request) -> web.Response:
        return web.json_response(self.refunds)

    async def order(self, request: web.Request) -> web.Response:
        bag = {"id": BAG_ID, "status": self.status, "total": TOTAL, "currency": "USD"}
        return web.json_response({"id": ORDER_ID, "currency": "USD", "bags": [bag]})


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        34,
        "review34-secret",
        token="review34-token-0123456789",
        base_url=url + "/v1",
        clock=clock,
        retry=RetryPolicy(max_attempts=2, deadline=60.0, jitter=False),
    )


async def test_a_cancel_does_not_spend_a_whole_bag_refunds_mark() -> None:
    """A whole-bag refund and a cancel have the same body (``{}``), and the bag's
    read-first mark was kept by body alone.

    Call A: a whole-bag refund (no amount) of bag 34002; its POST is answered 429
    (``Retry-After: 10``). 9.5 s into the wait another system refunds the whole bag
    (5000, refund 900, the bag now REFUNDED). A's caller cuts A at 9.8 s: every send
    proven not applied, the bag is marked. At 9.8 s a cancel of the bag begins (begun
    after the mark): it reads the bag first and, its body ``{}`` being A's, spends A's
    mark; Violet refuses it (400). A's caller repeats A: no mark, no read before the
    send; its POST is answered with Violet's own 500 (nothing applied), and the
    read-back took refund 900, made by the other system 0.3 s before the repeat's send,
    as the repeat's own: "refunded", for a refund this ask never made."""
    clock = FakeClock()
    bag = WholeBag(clock)
    async with serve(bag.app()) as url, _client(url, clock) as client:
        clock.call_later(9.5, lambda: bag.add(TOTAL))
        a = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID))
        clock.call_later(9.8, a.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await a
        with contextlib.suppress(VioletError):
            await client.cancel_bag(ORDER_ID, BAG_ID)
        try:
            got: OrderRefund | VioletError = await client.refund_bag(ORDER_ID, BAG_ID)
        except VioletError as exc:
            got = exc
    assert bag.posts[:3] == ["refund", "cancel", "refund"]
    assert [r["id"] for r in bag.refunds] == [900], "only the other system's refund"
    assert not (isinstance(got, OrderRefund) and got.id == 900), (
        "another system's refund handed over as the repeat's own"
    )


class ConflictBag:
    """One bag. Refund POST 1: 429 (``Retry-After: 10``); POST 2: 409 (Violet refuses
    it: the bag is busy); later POSTs: Violet's own 500, nothing applied. ``Date`` on
    every answer; GET lists the bag's refunds and counts the reads."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0
        self.reads = 0

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
        if self.posts == 1:
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "10"}
            )
        if self.posts == 2:
            busy = {"status": 409, "message": "Bag is being updated", "error_code": 4090}
            return web.json_response(busy, status=409)
        return web.json_response(VIOLET_500, status=500)

    async def listed(self, request: web.Request) -> web.Response:
        self.reads += 1
        return web.json_response(self.refunds)


async def test_a_repeat_refused_after_spending_the_mark_leaves_the_next_repeat_unread() -> None:
    """Call A asks 500 of the bag; its POST is answered 429 (``Retry-After: 10``). 9.5 s
    into the wait another system refunds 500 (refund 700). A's caller cuts A at 9.8 s:
    the bag is marked. The caller repeats (R1, at 9.8 s): it reads the bag (700 in its
    baseline), spends the mark, and its POST is refused, 409 (the bag busy with the
    other system's refund): "failed", nothing applied. The caller repeats again (R2):
    no mark, no read before the send; its POST is answered with Violet's own 500
    (nothing applied), and its read-back took refund 700, made 0.3 s before R2's send,
    as R2's own: "refunded", for a refund no ask of this caller made. (An ask that
    spent the mark and ended with nothing applied leaves its caller's next repeat a new
    ask, while the wait's refunds are still within reach of its window.)"""
    clock = FakeClock()
    bag = ConflictBag(clock)
    async with serve(bag.app()) as url, _client(url, clock) as client:
        clock.call_later(9.5, lambda: bag.add(500))
        a = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500))
        clock.call_later(9.8, a.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await a
        refused: VioletError | None = None
        try:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500)
        except VioletError as exc:
            refused = exc
        assert refused is not None
        assert getattr(refused, "status", None) == 409
        assert bag.reads == 1, "R1 read the bag before its send"
        try:
            got: OrderRefund | VioletError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=500
            )
        except VioletError as exc:
            got = exc
    assert bag.posts >= 3, "R2's POST, answered 500: nothing applied"
    assert [r["id"] for r in bag.refunds] == [700], "only the other system's refund"
    assert not (isinstance(got, OrderRefund) and got.id == 700), (
        "another system's refund handed over as the repeat's own"
    )


class Scripted:
    """One bag whose refund POSTs are answered, in turn, as ``answers`` says (429 with
    ``Retry-After: 10``, or Violet's own 500, nothing applied; 500 once they run out).
    ``Date`` on every answer; GET lists the bag's refunds."""

    def __init__(self, clock: FakeClock, answers: list[int]) -> None:
        self.clock = clock
        self.answers = answers
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

    def add(self, amount: int) -> None:
        made = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        self.refunds.append(
            {
                "id": 600 + len(self.refunds),
                "order_id": ORDER_ID,
                "bag_id": BAG_ID,
                "amount": amount,
                "status": "COMPLETED",
                "date_created": made.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    async def refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        if (self.answers.pop(0) if self.answers else 500) == 429:
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "10"}
            )
        return web.json_response(VIOLET_500, status=500)

    async def listed(self, request: web.Request) -> web.Response:
        return web.json_response(self.refunds)


async def test_a_resume_cut_in_a_429_wait_leaves_the_next_resume_of_the_copy_unread() -> None:
    """A refund of 500: its POST (t=0) is answered with Violet's own 500; read back
    until the call's 30 s deadline, nothing listed: pending (record P0, one send, "may
    have applied"). At t=100 the caller resumes P0: the window is over, the bag lists
    nothing, the ask is proven absent and sent again (POST 2), answered 429
    (``Retry-After: 10``). 9.5 s into that wait another system refunds 500 (refund 600);
    the caller's ``wait_for`` cuts the resume at 9.8 s (every send proven not applied;
    the caller is left with P0, the only record it was handed). The caller resumes P0
    again: the client forgot that the resume it cut had proven P0's send absent, P0
    reads back as "may have applied" from t=0, and refund 600, listed since, dated
    after that send, was returned as the ask's own, with no request: "refunded", for a
    refund this ask never made."""
    clock = FakeClock()
    bag = Scripted(clock, [500, 429])
    async with (
        serve(bag.app()) as url,
        VioletClient(
            34,
            "review34-secret",
            token="review34-token-0123456789",
            base_url=url + "/v1",
            clock=clock,
            retry=RetryPolicy(max_attempts=3, deadline=30.0, jitter=False),
        ) as client,
    ):
        try:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=500)
        except AmbiguousOutcomeError as exc:
            p0 = exc.pending
        assert p0 is not None
        clock.advance(100.0 - (clock.monotonic() - clock.start))
        first = asyncio.ensure_future(client.resume(p0))
        clock.call_later(9.5, lambda: bag.add(500))
        clock.call_later(9.8, first.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert bag.posts == 2, "the re-send, answered 429: nothing applied"
        try:
            got: OrderRefund | VioletError = await client.resume(p0)
        except VioletError as exc:
            got = exc
    assert [r["id"] for r in bag.refunds] == [600], "only the other system's refund"
    assert not (isinstance(got, OrderRefund) and got.id == 600), (
        "another system's refund handed over as the ask's own"
    )
