"""The fleet gets the matching rule's answers on review 8's record shapes: a worker
whose ledger was lost re-runs an item already refunded, and its guard read (through
the engine, ``hold_if_present``) holds it; on a real redis-server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, SkuRefund
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, item_key
from violet_async.testing import FakeViolet, FaultPlan, ServerQuirks

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key
FAST = RetryPolicy(settle_running=0.5, settle_lag=0.2, settle_delay=0.05)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()
    try:
        yield client
    finally:
        await client.aclose()


async def _run_twice(fake: FakeViolet, redis: Redis, item: BatchItem) -> list[dict[str, object]]:
    """Run ``item``, lose the ledger, run it again in a fresh worker."""
    key = item_key(item)
    results = []
    for _ in range(2):
        async with fake.client(retry=FAST) as client:
            worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis))
            results.append(await worker.run(key, item, worker.ledger.sign(key, item)))
        await redis.flushall()
        await RedisLedger(redis).new_fleet()
    return results


async def test_fleet_whole_bag_item_beside_dead_and_other_bags_records_is_held(
    redis: Redis,
) -> None:
    plan = FaultPlan(quirks=ServerQuirks(bag_status_lag=600.0, list_other_bags=True))
    async with FakeViolet(faults=plan) as fake:
        spec = {"skus": [{"quantity": 2, "price": 500}]}
        order = fake.add_order([spec, spec])
        bag_id, other = list(order.bags)
        fake.another_actor_refund(order.id, other, 300, status="COMPLETED", age_seconds=60)
        fake.failed_attempt(order.id, bag_id, 400, age_seconds=60)
        item = BatchItem.refund(1, order.id, bag_id, RefundBagRequest(reason="damaged"))
        first, again = await _run_twice(fake, redis, item)
        assert first["state"] == "applied"
        assert (again["state"], again["outcome"]) == ("failed", "already_present")
        assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_fleet_sku_item_whose_records_list_no_lines_is_never_sent_again(
    redis: Redis,
) -> None:
    plan = FaultPlan(quirks=ServerQuirks(listed_without_skus=True))
    async with FakeViolet(faults=plan) as fake:
        order = fake.add_order([{"skus": [{"quantity": 2, "price": 500}]}])
        bag = next(iter(order.bags.values()))
        request = RefundBagRequest(
            skus=[SkuRefund(order_sku_id=bag.skus[0].order_sku_id, quantity_refunded=1)]
        )
        item = BatchItem.refund(1, order.id, bag.id, request)
        first, again = await _run_twice(fake, redis, item)
        assert first["state"] == "applied"
        assert again["state"] != "applied"
        assert fake.ledger.refunds_per_bag[bag.id] == 1
        assert len(fake.ledger.posts_per_bag[bag.id]) == 1
