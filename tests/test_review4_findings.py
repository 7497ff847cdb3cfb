"""Findings of a fresh adversarial review of issue 24's batch and fleet work, each
against a small scripted server of its own (aiohttp.web, 127.0.0.1, port 0) and, for
the fleet, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

if not os.environ.get("CI"):
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, Timeouts, VioletClient
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, RetryLaterError, item_key
from violet_async.testing import FakeClock

redis_url = _fleet_redis.redis_url

ORDER, BAG = 8101, 9101
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
TIMEOUTS = Timeouts(connect=1.0, read=2.0)


class Violet:
    """One bag of 1000. A POST commits at once and answers 200, or (``late``) commits
    ``late`` seconds later on ``clock`` and never answers."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0
        self.late: list[float] = []
        self.arrived = asyncio.Event()
        self.stop = asyncio.Event()

    def commit(self, amount: int, bag: int = BAG) -> dict[str, Any]:
        when = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        record = {
            "id": 4000 + len(self.refunds),
            "order_id": ORDER,
            "bag_id": bag,
            "amount": amount,
            "status": "COMPLETED",
            "date_created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.refunds.append(record)
        return record

    async def post(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        self.arrived.set()
        amount = (await request.json())["amount_refunded"]
        bag = int(request.match_info["b"])
        if self.late:
            self.clock.call_later(self.late.pop(0), lambda: self.commit(amount, bag))
            await self.stop.wait()
            return web.Response(status=504)
        return web.json_response(self.commit(amount, bag))

    async def listing(self, request: web.Request) -> web.Response:
        bag = int(request.match_info["b"])
        return web.json_response([r for r in self.refunds if r["bag_id"] == bag])

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "tok-0123456789abcdef", "refresh_token": "r-0123456789"})

    async def order(self, request: web.Request) -> web.Response:
        return web.json_response({"id": ORDER, "bags": [{"id": BAG, "status": "ACCEPTED"}]})

    @web.middleware
    async def dated(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = formatdate(self.clock.time(), usegmt=True)
        return response


@contextlib.asynccontextmanager
async def serving(violet: Violet) -> AsyncIterator[str]:
    app = web.Application(middlewares=[violet.dated])
    app.router.add_post("/v1/login", violet.login)
    app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", violet.post)
    app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", violet.listing)
    app.router.add_get("/v1/orders/{o}", violet.order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        violet.stop.set()
        await runner.cleanup()


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        11,
        "review-secret",
        username="u",
        password="review-password-0123",
        base_url=url,
        clock=clock,
        retry=ROOMY,
        timeouts=TIMEOUTS,
    )


def _worker(client: VioletClient, redis: Redis) -> FleetWorker:
    return FleetWorker(client, RedisLedger(redis), BagLocks(redis, ttl=5.0, poll=0.02), None)


@pytest.mark.parametrize("ahead_by", [0.0, 600.0, -600.0])
async def test_a_worker_whose_clock_is_ahead_keeps_the_hold_after_redis_lost_the_ledger(
    redis_url: str, ahead_by: float
) -> None:
    """Redis restarts empty while worker A's POST is in flight (it commits 30 s later);
    A dies, the file is enqueued again. Worker C (its clock right) meets the lost
    ledger first and makes the new epoch, which holds sends for a settle window by C's
    clock. Worker B, whose clock is 10 minutes ahead, runs the item: the hold must
    hold it too (it is judged by one clock, Redis's, not each worker's). It used to
    find the hold over at once, send, and the late POST made a second refund."""
    item = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    other = BatchItem.refund(2, ORDER, BAG + 1, RefundBagRequest(amount_refunded=100))
    key, other_key = item_key(item), item_key(other)
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    await RedisLedger(redis).new_fleet()
    clock = FakeClock()
    ahead = FakeClock(wall_start=clock.time() + ahead_by)
    violet = Violet(clock)
    violet.late = [30.0]
    try:
        async with serving(violet) as url:
            async with _client(url, clock) as a_client:
                first = _worker(a_client, redis)
                await first.ledger.register(key, item)
                running = asyncio.ensure_future(first.run(key, item))
                await violet.arrived.wait()
                await redis.flushall()  # Redis restarted with nothing
                running.cancel()  # ... and worker A went with it
                await asyncio.gather(running, return_exceptions=True)
            async with _client(url, clock) as c_client:
                # Worker C meets the lost ledger first (another item): the new epoch.
                with contextlib.suppress(RetryLaterError):
                    await _worker(c_client, redis).run(other_key, other)
            async with _client(url, ahead) as b_client:
                b = _worker(b_client, redis)
                with contextlib.suppress(RetryLaterError):
                    await b.run(key, item)
                clock.advance(60.0)  # A's POST lands
                ahead.advance(60.0)
                result = await b.run(key, item)  # arq runs it again after the hold
    finally:
        await redis.aclose()
    assert [r["bag_id"] for r in violet.refunds].count(BAG) == 1, violet.refunds
    assert result["outcome"] == "already_present"
