"""Review 31: a batch row whose read before its send is answered 429, on a server
scripted here (one bag; the refund list answered 429 while ``limited`` is set)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from violet_async import RetryPolicy, VioletClient
from violet_async.batch import BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

from .conftest import serve

ORDER_ID, BAG_ID = 31001, 31002


class Bag:
    """One bag of 1000: a POST refunds what it asks; the refund list answers 429
    while ``limited`` (every read: its own retries see the same)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.limited = False
        self.posts = 0
        self.limited_reads = 0

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
        if self.limited:
            self.limited_reads += 1
            return web.json_response({"message": "Too many requests"}, status=429)
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


async def test_a_429_to_the_read_before_a_rows_send_leaves_it_not_sent(tmp_path: Path) -> None:
    """The read of the bag before a row's first send (the baseline) answered 429: nothing
    was sent. The row ended ``failed`` (a definite failure, which a 429 never is), was
    journaled so, and the next run skipped it as ``already_failed``: the shopper was
    never refunded, and no run would send it without ``--retry-failed`` (simulator seed
    1321726 is this, on a resumed row)."""
    clock = FakeClock()
    bag = Bag(clock)
    journal = tmp_path / "rows.journal.jsonl"
    async with serve(bag.app()) as url:
        bag.limited = True
        first = await _run(url, clock, journal)
        assert bag.limited_reads >= 1
        assert bag.posts == 0
        assert first == [("not_sent", "RateLimitError")]
        bag.limited = False
        second = await _run(url, clock, journal)
    assert second == [("succeeded", None)]
    assert len(bag.refunds) == 1, "one refund, sent by the run after the 429"
