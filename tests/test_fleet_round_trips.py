"""What an item costs in Redis round trips, and that each merged round trip does what
its separate ones did: arq's claim as one script for every free slot, the bag's reads
riding on the lock's ``SET NX``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetPace,
    FleetWorker,
    RedisLedger,
    create_fleet_pool,
    enqueue,
    item_key,
)
from violet_async.fleet._arq import (
    _CLAIM,
    QUEUE_NAME,
    FleetArqWorker,
    FleetConfig,
    close_worker,
    job_id,
    worker_settings,
)
from violet_async.fleet._lock import LockBusyError
from violet_async.testing import FakeViolet

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    arq = await create_fleet_pool(redis_url)
    await arq.flushall()
    await RedisLedger(arq).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield arq
    finally:
        await arq.aclose()


def _item(line: int, order_id: int, amount: int = 500) -> BatchItem:
    return BatchItem.refund(
        line, order_id, order_id + 100_000, RefundBagRequest(amount_refunded=amount)
    )


async def _reads(redis: Redis) -> int:
    """Redis's count of read events: one a round trip of a client."""
    return int((await redis.info("stats"))["total_reads_processed"])


async def test_claim_script_claims_due_jobs_once(pool: ArqRedis) -> None:
    """arq's claim as one script: due jobs are claimed in order, each once (its
    in-progress key set with the ttl), up to the number asked for; a job in progress,
    not queued, or not due is passed over, and the answer says how far it looked."""
    claim = pool.register_script(_CLAIM)
    now = 1_000_000
    await pool.zadd(QUEUE_NAME, {"a": now - 5, "busy": now - 4, "later": now + 60_000, "b": 7})
    await pool.set(in_progress_key_prefix + "busy", "1")
    ids = ["a", "busy", "gone", "later", "b"]

    async def run(want: int, jobs: list[str]) -> list[object]:
        keys = [QUEUE_NAME, *(in_progress_key_prefix + j for j in jobs)]
        return list(await claim(keys=keys, args=[now, 30_000, want, *jobs]))

    assert await run(1, ids) == [1, b"a", str(now - 5).encode()]
    assert 0 < await pool.pttl(in_progress_key_prefix + "a") <= 30_000
    assert await run(5, ids) == [5, b"b", b"7"]  # "a" is in progress now
    assert await run(5, ids) == [5]  # every one taken, gone or not due
    for passed in ("gone", "later"):
        assert not await pool.exists(in_progress_key_prefix + passed)
    assert await pool.get(in_progress_key_prefix + "busy") == b"1"


@pytest.mark.parametrize("claim_script", [True, False])
async def test_two_fleet_arq_workers_run_each_job_once(
    pool: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch, claim_script: bool
) -> None:
    """Two workers claiming from one queue in one process: every job runs once (arq's
    counts), every item applied, each bag refunded once; also with arq's own claim (an
    arq release other than the one the claim script follows)."""
    from violet_async.fleet import _arq

    monkeypatch.setattr(_arq, "_CLAIMS_AS_ARQ", claim_script)
    items = [_item(n, 100000 + n) for n in range(1, 13)]
    async with FakeViolet(orders=12, seed=7) as fake:
        await enqueue(pool, items)
        for name, value in (
            ("VIOLET_APP_ID", str(fake.app_id)),
            ("VIOLET_APP_SECRET", fake.app_secret),
            ("VIOLET_USERNAME", fake.username),
            ("VIOLET_PASSWORD", fake.password),
            ("VIOLET_FLEET_CONCURRENCY", "4"),
        ):
            monkeypatch.setenv(name, value)
        config = FleetConfig.from_env(redis_url=redis_url, base_url=fake.base_url)
        workers = [
            FleetArqWorker(**worker_settings(config), burst=True, handle_signals=False)
            for _ in range(2)
        ]
        try:
            await asyncio.gather(*(w.main() for w in workers))
        finally:
            for worker in workers:
                await close_worker(worker)
        assert sum(w.jobs_complete for w in workers) == len(items)
        assert sum(w.jobs_failed + w.jobs_retried for w in workers) == 0
        assert fake.ledger.total_refunds == len(items)
        assert not fake.ledger.double_refunds()
    counts = await RedisLedger(pool).counts()
    assert counts["applied"] == len(items)
    for key in (item_key(i) for i in items):
        assert not await pool.exists(f"arq:in-progress:{job_id(key)}")


async def test_lock_reads_ride_on_the_set_nx(pool: ArqRedis) -> None:
    """The reads queued with a lock's ``SET NX`` are answered as it is taken; while
    another holds it they are thrown away and the lock is waited for as before."""
    locks = BagLocks(pool, poll=0.01)
    await pool.set("seen", "first")

    def reads(pipe: object) -> None:
        pipe.get("seen")  # type: ignore[attr-defined]

    held = await locks.acquire(7, reads=reads)
    assert held.reads == [b"first"]
    assert (await locks.acquire(8)).reads is None  # none asked for
    with pytest.raises(LockBusyError):
        await locks.acquire(7, wait=0.05, reads=reads)
    await pool.set("seen", "after")
    await locks.release(held)
    async with locks.hold(7, reads=reads) as again:
        assert again.reads == [b"after"]  # read under the new holder's lock


async def test_an_items_happy_path_round_trips(pool: ArqRedis) -> None:
    """One item, run to applied by a worker with merchant pace on: 4 Redis round trips
    (9 before the bag's reads and the merchant-lane flag rode on the lock's SET NX; 7
    before the merchant's success and the read back rode on the applied write's, and
    the lock's release in its script)."""
    async with FakeViolet(orders=2, seed=3) as fake:
        client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2))
        async with client:
            worker = FleetWorker(client, RedisLedger(pool), BagLocks(pool), merchant_pace=True)
            warm = _item(1, 100001)
            await worker.run(item_key(warm), warm, worker.ledger.sign(item_key(warm), warm))
            item = _item(2, 100002)
            key = item_key(item)
            await worker.ledger.register(key, item)
            before = await _reads(pool)
            summary = await worker.run(key)
            spent = await _reads(pool) - before - 1  # the INFO read itself
        assert summary["state"] == "applied"
        assert summary["requests"] == 2
        assert fake.ledger.refunds_per_bag[item.bag_id] == 1
    # get, lock + the bag's reads + the lane flag, the sent record, the applied record
    # with the lock's release + the merchant's success + the read back with the counts.
    assert spent == 4, spent
    assert not await pool.exists(BagLocks(pool).key(item.bag_id))  # let go of


async def test_applied_success_and_read_back_ride_one_round_trip(pool: ArqRedis) -> None:
    """The applied write, the merchant lane's success and the record read back with the
    run's counts are one round trip, in that order: the record read shows the applied
    write and the counts; the lane counts the success."""
    ledger = RedisLedger(pool)
    pace = FleetPace(pool, 7)
    item = _item(1, 100001)
    key = item_key(item)
    await ledger.register(key, item)
    # Each script loaded once, as a worker's first item loads them.
    await pool.script_flush()
    await ledger.mark_applied_and_read(
        item_key(_item(2, 100002)),
        200002,
        None,
        reconciled=True,
        outcome="reconciled",
        counts=(0, 0),
    )
    await pace.succeeded(20001, order_id=100009)
    before = await _reads(pool)
    done, record = await ledger.mark_applied_and_read(
        key,
        item.bag_id,
        55,
        reconciled=False,
        outcome="applied",
        paid=500,
        then=[pace.success_call(20001, order_id=item.order_id)],
        counts=(2, 1),
    )
    spent = await _reads(pool) - before - 1  # the INFO read itself
    assert spent == 1, spent
    assert done == 1
    assert record is not None
    assert (record.state, record.refund_id, record.requests, record.rate_limited) == (
        "applied",
        55,
        2,
        1,
    )
    assert await pace.merchant_of(item.order_id) == 20001
    assert await pool.hget("{violet}:pace:7:20001", "ok_cur") == b"2"
    assert await ledger.bag_refunds(item.bag_id) == {55}


async def test_applied_and_read_after_redis_forgot_its_scripts(pool: ArqRedis) -> None:
    """Redis restarted (its scripts flushed) between two items: the applied write that
    did not run (NOSCRIPT) runs in its turn, and the record is read again after it; the
    counts are added once. An item ended already is left as it was (0), and a refund
    another item owns is refused (-1), nothing written."""
    ledger = RedisLedger(pool)
    pace = FleetPace(pool, 7)
    item, other = _item(1, 100001), _item(2, 100001, amount=300)
    key, other_key = item_key(item), item_key(other)
    await ledger.register(key, item)
    await ledger.register(other_key, other)
    await pool.script_flush()
    done, record = await ledger.mark_applied_and_read(
        key,
        item.bag_id,
        55,
        reconciled=False,
        outcome="applied",
        then=[pace.success_call(20001, order_id=item.order_id)],
        counts=(2, 0),
    )
    assert done == 1
    assert record is not None
    assert (record.state, record.refund_id, record.requests) == ("applied", 55, 2)
    assert await pool.hget("{violet}:pace:7:20001", "ok_cur") == b"1"
    await pool.script_flush()
    done, record = await ledger.mark_applied_and_read(
        key, item.bag_id, 55, reconciled=False, outcome="applied", counts=(1, 0)
    )
    assert done == 0
    assert record is not None
    assert (record.state, record.requests) == ("applied", 3)
    done, record = await ledger.mark_applied_and_read(
        other_key, other.bag_id, 55, reconciled=False, outcome="applied"
    )
    assert done == -1
    assert record is not None
    assert record.state == "new"
    assert await ledger.bag_refunds(item.bag_id) == {55}


async def test_the_applied_write_lets_go_of_the_bags_lock_only_its_holders(
    pool: ArqRedis,
) -> None:
    """The applied write releases the bag's lock in its own script, only with the
    holder's token and only when it writes; a lock another worker holds now stays."""
    ledger = RedisLedger(pool)
    locks = BagLocks(pool)
    first, second, third = _item(1, 100001), _item(2, 100002), _item(3, 100003)
    for item in (first, second, third):
        await ledger.register(item_key(item), item)
    held = await locks.acquire(first.bag_id)
    done, record = await ledger.mark_applied_and_read(
        item_key(first),
        first.bag_id,
        51,
        reconciled=False,
        outcome="applied",
        release=(held.key, held.token),
    )
    assert (done, record is not None and record.state) == (1, "applied")
    assert not await pool.exists(held.key)
    # Another worker holds the second bag now: its lock stays.
    other = await locks.acquire(second.bag_id)
    done, _ = await ledger.mark_applied_and_read(
        item_key(second),
        second.bag_id,
        52,
        reconciled=False,
        outcome="applied",
        release=(other.key, "not-the-holders-token"),
    )
    assert done == 1
    assert await pool.get(other.key) == other.token.encode()
    # Ended already (0): nothing written, the lock kept for the caller to release.
    again = await locks.acquire(first.bag_id)
    done, _ = await ledger.mark_applied_and_read(
        item_key(first),
        first.bag_id,
        51,
        reconciled=False,
        outcome="applied",
        release=(again.key, again.token),
    )
    assert done == 0
    assert await pool.get(again.key) == again.token.encode()
    # Without a lock to let go of (mark_applied), the third bag's lock is not touched.
    kept = await locks.acquire(third.bag_id)
    await ledger.mark_applied(
        item_key(third), third.bag_id, 53, reconciled=False, outcome="applied"
    )
    assert await pool.get(kept.key) == kept.token.encode()


async def test_once_a_429_was_seen_an_items_merchant_costs_no_round_trip_of_its_own(
    pool: ArqRedis,
) -> None:
    """With a lane started somewhere (a 429 seen), each item needs its merchant: the
    fleet's memory of its order is read with the bag's lock, and a merchant looked up
    (``GET /orders``) is noted in the reservation's own script. An item of a merchant
    the fleet knows: 6 round trips (was 7); one it must look up: 6 and the look-up (was
    8). Both are paced on their merchant's lane."""
    async with FakeViolet(orders=3, seed=3, merchants=2) as fake:
        client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2))
        async with client:
            worker = FleetWorker(client, RedisLedger(pool), BagLocks(pool), merchant_pace=True)
            pace = worker.pace
            assert pace is not None
            warm = _item(1, 100001)
            await worker.run(item_key(warm), warm, worker.ledger.sign(item_key(warm), warm))
            await pool.set(f"{{violet}}:pace:{fake.app_id}:learning", "1")
            await pace.reserve(99, 1.0)  # each script loaded once, as by a worker's first
            await pace.gate_slot(99, 1.0)
            spent = []
            for order_id in (100002, 100003):
                item = _item(order_id - 100000, order_id)
                merchant = fake.bag(order_id, item.bag_id).merchant_id
                if order_id == 100002:
                    await pace.learn(order_id, merchant)  # known to the fleet
                key = item_key(item)
                await worker.ledger.register(key, item)
                gets = fake.ledger.requests["get_order"]
                before = await _reads(pool)
                summary = await worker.run(key)
                spent.append(await _reads(pool) - before - 1)
                assert summary["state"] == "applied"
                assert await pace.merchant_of(order_id) == merchant
                looked_up = fake.ledger.requests["get_order"] - gets
                assert looked_up == (order_id == 100003)
    # get, lock + reads (+ the order's merchant), the reservation (noting a merchant
    # looked up), the send gate, the sent record, the applied record and the rest.
    assert spent == [6, 6], spent
