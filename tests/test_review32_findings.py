"""Review 32, on a server scripted here (127.0.0.1, port 0, on a FakeClock shared
with the client): a call whose re-send after a 429's wait was answered 2xx with a
refund that moved no money (FAILED), and its caller's repeat."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RefundFailedError,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async.batch import BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

from .conftest import serve
from .hostile import BAG_ID as HOSTILE_BAG
from .hostile import GATEWAY_504, VIOLET_500, Hostile, Step, hostile_client
from .hostile import ORDER_ID as HOSTILE_ORDER

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


class WrongPage:
    """One bag of 1000 holding two refunds of other systems, listed one a page. While
    ``wrong`` is set, a page after the first is answered with page 0 of another bag's
    list (a cache keyed wrongly: ``number`` 0, one refund of bag 999). POST 1 is
    answered 429 (``Retry-After: 5``); POST 2 commits and is answered by a gateway's
    504. ``Date`` on every answer."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0
        self.wrong = False
        self.wrong_pages = 0

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

    def add(self, amount: int, at: float) -> dict[str, Any]:
        made = datetime.fromtimestamp(at, timezone.utc)
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
            self.wrong = True
            return web.json_response(
                {"message": "Too many requests"}, status=429, headers={"Retry-After": "5"}
            )
        self.wrong = False
        self.add(body["amount_refunded"], self.clock.time())
        return web.Response(status=504, body=b"<html><body>504 Gateway Time-out</body></html>")

    async def listed(self, request: web.Request) -> web.Response:
        page = int(request.query.get("page", "0"))
        if self.wrong and page > 0:
            self.wrong_pages += 1
            other = {
                "id": 5555,
                "order_id": 4242,
                "bag_id": 999,
                "amount": 10,
                "status": "COMPLETED",
                "date_created": "2026-01-01T00:00:00Z",
            }
            one = {"content": [other], "number": 0, "size": 1, "total_pages": 1}
            return web.json_response({**one, "total_elements": 1, "last": True})
        chunk = self.refunds[page : page + 1]
        pages = max(1, len(self.refunds))
        return web.json_response(
            {
                "content": chunk,
                "number": page,
                "size": 1,
                "total_pages": pages,
                "total_elements": len(self.refunds),
                "last": page + 1 >= pages,
            }
        )


async def test_another_bags_page_in_the_read_before_a_re_send_never_keeps_its_refund_pending() -> (
    None
):
    """The read before the re-send after a 429 failed: its page 1 answered with another
    bag's page 0 (a cache keyed wrongly). Since seed 1235637's fix, what the pages that
    answered listed joins the baseline: that bag's refund (id 5555) too. The re-send
    (504) applied and its refund was listed on every read after it, yet each read
    lacked 5555 and looked like "a replica behind an earlier read": the ask ended
    pending, and so did every resume, for good (before that fix it was claimed). Only
    records that may be this bag's join the baseline now: the refund is claimed."""
    clock = FakeClock()
    bag = WrongPage(clock)
    bag.add(111, clock.time() - 3600.0)
    bag.add(222, clock.time() - 3600.0)
    async with serve(bag.app()) as url:
        async with VioletClient(
            32,
            "review32-secret",
            token="review32-token-0123456789",
            base_url=url + "/v1",
            clock=clock,
            retry=RetryPolicy(deadline=600.0, jitter=False),
        ) as client:
            got: OrderRefund | AmbiguousOutcomeError
            try:
                got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
            except AmbiguousOutcomeError as exc:
                got = exc
            for _ in range(2):
                if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
                    await clock.sleep(120.0)
                    try:
                        got = await client.resume(got.pending)
                    except AmbiguousOutcomeError as exc:
                        got = exc
    assert bag.wrong_pages >= 1
    assert bag.posts == 2
    ours = bag.refunds[-1]
    assert [r["amount"] for r in bag.refunds] == [111, 222, 300], "one refund of ours"
    assert isinstance(got, OrderRefund), got
    assert got.id == ours["id"]


TOO_MANY = b'{"status": 429, "message": "Too Many Requests", "error_code": 4290}'


def _late_then_two_429s() -> Hostile:
    """POST 1: a gateway's 504 that commits, its refund listed only 75 s later (beyond
    the 60 s window); POST 2 and POST 3: 429 (``Retry-After`` 5 s, then 10 s); POST 4:
    Violet's own 500, nothing applied; any later POST applies."""
    server = Hostile(FakeClock(), list_lag=75.0)
    server.script = [
        Step(504, body=GATEWAY_504, commit_after=0.0),
        Step(429, body=TOO_MANY, commit_after=None, headers={"Retry-After": "5"}),
        Step(429, body=TOO_MANY, commit_after=None, headers={"Retry-After": "10"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    return server


@pytest.mark.parametrize("attempts", [4, 6])
async def test_a_late_refund_listed_after_a_second_429_is_never_sent_for_again(
    attempts: int,
) -> None:
    """Review 28's case with one more 429: the reads prove POST 1 absent (its refund
    not listed yet); POST 2 is answered 429 and the read after the wait still misses
    the refund, so the re-send's window moved to it; POST 3 is answered 429 and the
    read after that wait lists the refund: it joined the baseline as "not this ask's".
    POST 4 (500) was proven absent and the ask sent a fifth POST: two refunds (with
    four attempts, out of them: "failed", ServerError, while POST 1's refund was on
    the bag). It ends for review now: one refund, nothing sent after the read."""
    server = _late_then_two_429s()
    retry = RetryPolicy(
        max_attempts=attempts, initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False
    )
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | VioletError = await client.refund_bag(
                HOSTILE_ORDER, HOSTILE_BAG, amount_refunded=300
            )
        except VioletError as exc:
            got = exc
    assert server.refunded == 300, f"refunded {server.refunded} for one ask of 300"
    assert server.posts == 3
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review
    assert [r.id for r in got.candidates] == server.ours


async def test_a_batch_row_never_sends_again_over_a_late_refund_listed_after_a_second_429(
    tmp_path: Path,
) -> None:
    """The same as a batch row (its 429s deferred to its merchant's turn): the row was
    sent a fifth time and refunded twice. It ends for review (unknown) now."""
    server = _late_then_two_429s()
    retry = RetryPolicy(
        max_attempts=6, initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False
    )
    item = BatchItem.refund(1, HOSTILE_ORDER, HOSTILE_BAG, RefundBagRequest(amount_refunded=300))
    async with hostile_client(server, retry=retry) as client:
        results = [r async for r in run_batch(client, [item], journal=tmp_path / "j.jsonl")]
    assert server.refunded == 300, f"refunded {server.refunded} for one row of 300"
    assert [r.outcome for r in results] == ["unknown"], results
