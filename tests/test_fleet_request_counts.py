"""What a fleet item cost at Violet: each item's answered requests and 429s, summed over
its runs in the ledger, the fleet's totals, and ``status`` printing both."""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import AsyncIterator

import orjson
import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy
from violet_async._telemetry import capture_responses
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, RetryLaterError, item_key
from violet_async.fleet import _cli as fleet_cli
from violet_async.testing import FakeViolet, Fault

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield client
    finally:
        await client.aclose()


async def test_an_items_requests_and_429s_add_up_over_its_runs(redis: Redis) -> None:
    """A 429 hands the item back; its next run applies it. The ledger holds the item's
    requests and 429s over both runs: exactly what was answered (a caller's own
    capture_responses still sees every response), and the fleet's totals add up."""
    async with FakeViolet(orders=2, seed=1, merchants=2) as fake:
        (o1, b1), (o2, b2) = fake.seeded
        fake.script("refund", Fault.RATE_LIMIT, bag_id=b1)
        async with fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2)) as client:
            ledger = RedisLedger(redis)
            worker = FleetWorker(client, ledger, BagLocks(redis), patience=0.0)
            strict = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
            other = BatchItem.refund(2, o2, b2, RefundBagRequest(amount_refunded=100))
            key, other_key = item_key(strict), item_key(other)
            await ledger.register(key, strict)
            await ledger.register(other_key, other)
            # The happy path, before any 429: a baseline read and the POST.
            with capture_responses() as happy:
                plain = await worker.run(other_key)
            assert (plain["requests"], plain["rate_limited"]) == (2, 0) == (len(happy), 0)
            with capture_responses() as first:
                with pytest.raises(RetryLaterError):
                    await worker.run(key)
            assert [r.status for r in first].count(429) == 1
            record = await ledger.get(key)
            assert record is not None
            assert record.state == "new"
            assert (record.requests, record.rate_limited) == (len(first), 1)
            # Its merchant's lane is due now: the second run sends and applies.
            assert worker.pace is not None
            lane = f"{{violet}}:pace:{fake.app_id}:{fake.bag(o1, b1).merchant_id}"
            await redis.hset(lane, mapping={"tat": 0, "sent_tat": 0})
            with capture_responses() as second:
                done = await worker.run(key)
            assert done["state"] == "applied"
            assert 429 not in [r.status for r in second]
            assert (done["requests"], done["rate_limited"]) == (len(first) + len(second), 1)
            # A run of an applied item asks nothing and adds nothing.
            again = await worker.run(key)
            assert (again["requests"], again["rate_limited"]) == (done["requests"], 1)
            stored = await ledger.get(key)
            assert stored is not None
            assert stored.to_dict()["requests"] == done["requests"]
            assert await ledger.request_counts() == {
                "requests": done["requests"] + 2,
                "rate_limited": 1,
            }
    assert fake.ledger.double_refunds() == {}


async def test_counts_never_make_a_record_the_ledger_lost(redis: Redis) -> None:
    """Counting for an item Redis no longer holds writes nothing: a hash with only
    counts in it would read as an item. A count field someone else wrote as text
    reads as 0 (a count decides nothing)."""
    ledger = RedisLedger(redis)
    assert await ledger.add_requests("refund:1:2:abc:0", 3, 1) is None
    assert await redis.exists(ledger.record_key("refund:1:2:abc:0")) == 0
    assert await ledger.request_counts() == {"requests": 0, "rate_limited": 0}
    item = BatchItem.refund(1, 100001, 200001, RefundBagRequest(amount_refunded=100))
    key = item_key(item)
    await ledger.register(key, item)
    assert await ledger.add_requests(key, 2, 0) == (2, 0)
    assert await ledger.add_requests(key, 3, 1) == (5, 1)
    await redis.hset(ledger.record_key(key), "requests", "many")
    record = await ledger.get(key)
    assert record is not None
    assert (record.requests, record.rate_limited) == (0, 1)


async def test_status_prints_the_fleets_requests_and_each_items(
    redis: Redis, redis_url: str
) -> None:
    """``status`` states requests and 429s a item over the fleet; ``--items`` lists
    every item's, and ``--json`` carries the same numbers."""
    async with FakeViolet(orders=2, seed=3) as fake:
        async with fake.client() as client:
            ledger = RedisLedger(redis)
            worker = FleetWorker(client, ledger, BagLocks(redis))
            for line, (order_id, bag_id) in enumerate(fake.seeded, start=1):
                item = BatchItem.refund(line, order_id, bag_id, RefundBagRequest())
                await ledger.register(item_key(item), item, source="rows.csv")
                assert (await worker.run(item_key(item)))["state"] == "applied"
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=False, items=True)
    out = io.StringIO()
    assert await fleet_cli._status(args, out) == 0
    text = out.getvalue()
    assert "requests 4 (2.00 an item; 429s 0, 0.00 an item)" in text
    assert "rows.csv:line 1: applied: order" in text
    assert text.count(": 2 request(s), 0 429(s)") == 2
    args.json = True
    out = io.StringIO()
    assert await fleet_cli._status(args, out) == 0
    data = orjson.loads(out.getvalue())
    assert (data["requests"], data["rate_limited"]) == (4, 0)
    assert [i["requests"] for i in data["items"]] == [2, 2]
    # Without --items: the totals only.
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=True)
    out = io.StringIO()
    assert await fleet_cli._status(args, out) == 0
    assert "items" not in orjson.loads(out.getvalue())
