"""Issue 25, one item key, the fleet's side: a Redis ledger the previous release wrote
(its names written out here, by this file's own formula) with items in flight is
resumed by today's worker, which names the input's items with the one
``item_key``: every in-flight item is found, none is sent twice. Against the scripted
server of ``test_audit25_findings`` (refunds counted by its own record)."""

from __future__ import annotations

import os

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from collections.abc import AsyncIterator

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RetryPolicy, VioletClient
from violet_async._ask import sent_once
from violet_async._transport import Timeouts
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, keyed_items
from violet_async.testing import FakeClock

from .conftest import serve
from .test_audit25_findings import ORDER, Bags, _old_ledger_key, _refund

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield client
    finally:
        await client.aclose()


def _client(base: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        2526,
        "audit25-app-secret-0123456789abcdef",
        username="audit25-user",
        password="audit25-password-0123",
        base_url=base + "/v1",
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=60.0),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def test_an_old_ledger_with_items_in_flight_is_resumed_by_todays_keys(
    redis: Redis,
) -> None:
    """The previous release's ledger holds, under its own names: bag 41's item sent
    (its POST applied, the worker died), bag 42's item pending (applied, its answer
    lost), bag 43's two identical items, the first applied and the second sent (its
    POST lost before it reached Violet). Today's worker runs the same input, keyed by
    today's ``keyed_items``: the applied ones are read back and never re-sent, the
    lost one is sent once; one refund per item asked."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Bags(clock)
    rows = [_refund(1, 41), _refund(2, 42), _refund(3, 43), _refund(4, 43)]
    old = [_old_ledger_key(rows[0], 0), _old_ledger_key(rows[1], 0)]
    old += [_old_ledger_key(rows[2], 0), _old_ledger_key(rows[3], 1)]
    async with serve(server.app()) as base, _client(base, clock) as dead:
        ledger, locks = RedisLedger(redis), BagLocks(redis)
        # -- what the previous release's workers left, written under their names
        for key, row in zip(old, rows, strict=True):
            await ledger.register(key, row)
        for key, row in zip(old[:2], rows[:2], strict=True):
            ask = sent_once(
                "refund", ORDER, row.bag_id, row.request, clock.time(), baseline=frozenset()
            )
            held = await locks.acquire(row.bag_id)
            await ledger.mark_sent(key, ask, lock_key=held.key, token=held.token)
            await dead.refund_bag(ORDER, row.bag_id, _refund(0, row.bag_id).request)  # type: ignore[arg-type]  # applied, answer lost
            if row.bag_id == 42:
                await ledger.mark_pending(key, ask, lock_key=held.key, token=held.token)
            await locks.release(held)
        first = await FleetWorker(dead, ledger, locks, None).run(
            old[2], rows[2], ledger.sign(old[2], rows[2])
        )
        assert first["state"] == "applied"
        baseline = frozenset(r["id"] for r in server.made[43])
        ask = sent_once("refund", ORDER, 43, rows[3].request, clock.time(), baseline=baseline)
        held = await locks.acquire(43)
        await ledger.mark_sent(old[3], ask, lock_key=held.key, token=held.token)
        await locks.release(held)  # its POST never reached Violet
    assert (server.on(41), server.on(42), server.on(43)) == (1, 1, 1)
    posts = len(server.posts)

    clock.advance(600.0)
    async with serve(server.app()) as base, _client(base, clock) as client:
        worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis), None)
        keyed = list(keyed_items(rows))
        assert [k for k, _ in keyed] == old  # today's names are the ledger's
        results = [await worker.run(k, item, worker.ledger.sign(k, item)) for k, item in keyed]
        again = [await worker.run(k, item, worker.ledger.sign(k, item)) for k, item in keyed]
    assert [r["state"] for r in results] == ["applied"] * 4
    assert [r["reconciled"] for r in results] == [True, True, False, False]
    assert again == results
    assert (server.on(41), server.on(42), server.on(43)) == (1, 1, 2)
    assert len(server.posts) == posts + 1  # only the lost one, once
    assert server.posts[-1] == 43
