"""The fleet's exactly-once pieces on a real redis-server: ledger, bag lock, shared rate
limit, and FleetWorker against FakeViolet in this process."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import attrs
import orjson
import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy
from violet_async._ask import sent_once
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetRateLimit,
    FleetWorker,
    LockBusyError,
    LockLostError,
    RedisLedger,
    RetryLaterError,
    item_key,
    keyed_items,
)
from violet_async.testing import FakeViolet

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


def _item(line: int, order_id: int, amount: int = 500) -> BatchItem:
    request = RefundBagRequest(amount_refunded=amount)
    return BatchItem.refund(line, order_id, order_id + 100_000, request)


def test_keys_are_content_and_occurrence() -> None:
    a, b = _item(1, 100001), _item(7, 100001)
    assert item_key(a) == item_key(b)  # the line is not part of the key
    assert item_key(a) != item_key(_item(1, 100001, 501))
    keys = [k for k, _ in keyed_items([a, b, _item(9, 100002)])]
    assert keys[0].endswith(":0")
    assert keys[1] == keys[0][:-1] + "1"
    assert keys[2].endswith(":0")
    assert keys[0].startswith("refund:100001:200001:")


async def test_ledger_states_and_terminal(redis: Redis) -> None:
    ledger = RedisLedger(redis)
    item = _item(3, 100001)
    key = item_key(item)
    assert await ledger.register(key, item, source="f.csv") is None
    assert await ledger.register(key, item) == "new"
    record = await ledger.get(key)
    assert record is not None
    assert (record.state, record.item, record.source) == ("new", item, "f.csv")
    locks = BagLocks(redis)
    held = await locks.acquire(item.bag_id)
    ask = sent_once(
        "refund",
        item.order_id,
        item.bag_id,
        item.request,
        time.time(),
    )
    with pytest.raises(LockLostError):
        await ledger.mark_sent(key, ask, lock_key=held.key, token="not-mine")
    assert (await ledger.get(key)).state == "new"  # type: ignore[union-attr]
    await ledger.mark_sent(key, ask, lock_key=held.key, token=held.token)
    record = await ledger.get(key)
    assert record is not None
    assert record.state == "sent"
    assert record.pending() == ask
    await ledger.mark_applied(key, item.bag_id, 77, reconciled=True, outcome="reconciled")
    # Terminal: nothing moves it again, and no send can be recorded.
    await ledger.mark_failed(key, "X", "late", outcome="failed")
    await ledger.mark_pending(key, ask)
    with pytest.raises(LockLostError):
        await ledger.mark_sent(key, ask, lock_key=held.key, token=held.token)
    record = await ledger.get(key)
    assert record is not None
    assert (record.state, record.refund_id, record.reconciled) == ("applied", 77, True)
    assert await ledger.bag_refunds(item.bag_id) == {77}
    assert (await ledger.counts())["applied"] == 1
    assert await ledger.keys_in("applied") == [key]
    assert await ledger.get("missing") is None
    # The fixture's redis fsyncs every write: nothing to warn about.
    assert await ledger.check_durability() == []
    await redis.config_set("appendfsync", "everysec")
    try:
        assert await ledger.check_durability() == ["appendfsync is not always"]
    finally:
        await redis.config_set("appendfsync", "always")


async def test_bag_lock(redis: Redis) -> None:
    locks = BagLocks(redis, ttl=0.3, poll=0.01)
    held = await locks.acquire(5)
    with pytest.raises(LockBusyError):
        await locks.acquire(5, wait=0.05)
    other = BagLocks(redis)
    await other.release(type(held)(held.key, "someone-else"))  # not theirs: kept
    assert await redis.get(held.key) == held.token.encode()
    assert await locks.renew(held)
    await locks.release(held)
    assert await redis.get(held.key) is None
    assert not await locks.renew(held)
    assert held.lost.is_set()
    # Held in a block: renewed past its ttl; a stolen lock is noticed and reported.
    lost: list[bool] = []
    async with locks.hold(6, on_lost=lambda: lost.append(True)) as kept:
        await asyncio.sleep(0.5)
        assert await redis.get(kept.key) == kept.token.encode()
        await redis.set(kept.key, "thief")
        await asyncio.wait_for(kept.lost.wait(), 1)
    assert lost == [True]
    assert await redis.get(kept.key) == b"thief"  # never released another's lock


async def test_rate_limit_shared_and_adaptive(redis: Redis) -> None:
    a = FleetRateLimit(redis, 1, 50.0)
    b = FleetRateLimit(redis, 1, 50.0)
    started = time.monotonic()
    await asyncio.gather(*(lim.wait() for lim in (a, b) for _ in range(10)))
    # 20 sends at 50/s from two "workers": one schedule, about 0.38 s.
    assert time.monotonic() - started >= 0.3
    assert await a.slow_down() == 25.0
    assert await b.slow_down() == 25.0  # the same burst halves once
    assert await b.current() == 25.0
    assert await a.speed_up() == 27.5
    for _ in range(10):
        await a.speed_up()
    assert await a.current() == 50.0
    assert await a.wait(0.0) >= 0.0
    with pytest.raises(ValueError, match="rate"):
        FleetRateLimit(redis, 1, 0)


async def _worker(fake: FakeViolet, redis: Redis, **options: float) -> tuple[FleetWorker, object]:
    client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2, settle_delay=0.05))
    await client.__aenter__()
    worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis), None, **options)
    return worker, client


async def test_worker_runs_once_and_reruns_are_free(redis: Redis) -> None:
    async with FakeViolet(orders=3, seed=1) as fake:
        worker, client = await _worker(fake, redis)
        try:
            item = _item(1, 100001)
            key = item_key(item)
            first = await worker.run(key, item, worker.ledger.sign(key, item))
            assert first["state"] == "applied"
            assert first["refund_id"] is not None
            again = await worker.run(
                key, item, worker.ledger.sign(key, item)
            )  # at-least-once delivery: a re-run
            assert again == first
            assert fake.ledger.refunds_per_bag[item.bag_id] == 1
            assert len(fake.ledger.posts_per_bag[item.bag_id]) == 1
            # A second identical refund of the same bag (occurrence 1) is its own item:
            # the first's refund is known, so it is not mistaken for this one.
            second_key = [k for k, _ in keyed_items([item, item])][1]
            second = await worker.run(second_key, item, worker.ledger.sign(second_key, item))
            assert second["state"] == "applied"
            assert second["refund_id"] != first["refund_id"]
            assert fake.ledger.refunds_per_bag[item.bag_id] == 2
            with pytest.raises(LookupError):
                await worker.run("refund:1:2:x:0")
        finally:
            await client.aclose()  # type: ignore[attr-defined]


async def test_sent_record_is_resumed_by_read_back(redis: Redis) -> None:
    """A worker died after the POST left: the next run reads back, never re-sends."""
    async with FakeViolet(orders=3, seed=1) as fake:
        worker, client = await _worker(fake, redis)
        try:
            item = _item(1, 100002)
            key = item_key(item)
            ledger = worker.ledger
            await ledger.register(key, item)
            refunds = await client.list_bag_refunds(item.order_id, item.bag_id)  # type: ignore[attr-defined]
            now = time.time()
            ask = sent_once(
                "refund",
                item.order_id,
                item.bag_id,
                item.request,
                now,
                baseline=frozenset(r.id for r in refunds),
            )
            held = await worker.locks.acquire(item.bag_id)
            await ledger.mark_sent(key, ask, lock_key=held.key, token=held.token)
            # ... the POST left and applied, then the worker was killed:
            async with fake.client() as dead_worker:
                await dead_worker.refund_bag(item.order_id, item.bag_id, item.request)
            await worker.locks.release(held)
            posts = len(fake.ledger.posts_per_bag[item.bag_id])
            result = await worker.run(key, item, worker.ledger.sign(key, item))
            assert result["state"] == "applied"
            assert result["reconciled"]
            assert len(fake.ledger.posts_per_bag[item.bag_id]) == posts  # nothing re-sent
            assert fake.ledger.refunds_per_bag[item.bag_id] == 1
        finally:
            await client.aclose()  # type: ignore[attr-defined]


async def test_lost_ledger_record_is_held_back(redis: Redis) -> None:
    """The ledger lost everything (a Redis without fsync crashed): hold_if_present."""
    async with FakeViolet(orders=3, seed=1) as fake:
        worker, client = await _worker(fake, redis)
        try:
            item = _item(1, 100003)
            key = item_key(item)
            assert (await worker.run(key, item, worker.ledger.sign(key, item)))[
                "state"
            ] == "applied"
            await redis.flushall()
            fresh = fake.client()
            async with fresh:
                again = FleetWorker(fresh, RedisLedger(redis), BagLocks(redis))
                result = await again.run(key, item, again.ledger.sign(key, item))
            assert (result["state"], result["outcome"]) == ("failed", "already_present")
            assert fake.ledger.refunds_per_bag[item.bag_id] == 1
        finally:
            await client.aclose()  # type: ignore[attr-defined]


async def test_lost_lock_stops_before_sending(redis: Redis) -> None:
    item = _item(1, 100001)
    fake = FakeViolet(orders=3, seed=1)
    real_list = fake._list_refunds

    async def steal(request: object) -> object:
        # Another worker takes the bag between our baseline read and our send.
        answer = await real_list(request)  # type: ignore[arg-type]
        await redis.set(BagLocks(redis).key(item.bag_id), "another-worker")
        return answer

    fake._list_refunds = steal  # type: ignore[method-assign]
    async with fake:
        worker, client = await _worker(fake, redis)
        try:
            key = item_key(item)
            await worker.ledger.register(key, item)
            with pytest.raises(RetryLaterError, match="lock"):
                await worker.run(key, item, worker.ledger.sign(key, item))
            assert item.bag_id not in fake.ledger.posts_per_bag
            record = await worker.ledger.get(key)
            assert record is not None
            assert record.state == "new"
        finally:
            await client.aclose()  # type: ignore[attr-defined]


async def test_busy_bag_is_retried_later(redis: Redis) -> None:
    async with FakeViolet(orders=3, seed=1) as fake:
        worker, client = await _worker(fake, redis, lock_wait=0.05)
        try:
            item = _item(1, 100001)
            await worker.locks.acquire(item.bag_id)
            with pytest.raises(RetryLaterError, match="locked") as caught:
                await worker.run(item_key(item), item, worker.ledger.sign(item_key(item), item))
            assert caught.value.defer == 0.05
        finally:
            await client.aclose()  # type: ignore[attr-defined]


async def test_redis_dedup_store(redis: Redis) -> None:
    from violet_async.webhooks import ClaimResult
    from violet_async.webhooks._redis import RedisDedupStore

    store = RedisDedupStore(redis)
    other = RedisDedupStore(redis)  # another host's receiver
    claimants = (store, other, store)
    claims = await asyncio.gather(*(s.claim("evt-1", 5) for s in claimants))
    assert sorted(c.value for c in claims) == ["new", "running", "running"]
    # Which concurrent claim wins is up to the scheduler: the winner's release frees it,
    # a loser's release (it holds no claim) does not.
    winner = claimants[claims.index(ClaimResult.NEW)]
    loser = other if winner is store else store
    await loser.release("evt-1")
    assert await RedisDedupStore(redis).claim("evt-1", 5) is ClaimResult.RUNNING
    await winner.release("evt-1")
    assert await other.claim("evt-1", 5) is ClaimResult.NEW
    await other.done("evt-1")
    await store.release("evt-1")  # a done key stays done
    assert await store.claim("evt-1", 5) is ClaimResult.DONE
    assert await store.claim("evt-2", 0.05) is ClaimResult.NEW
    await asyncio.sleep(0.1)  # a crashed claimant's claim expires
    assert await other.claim("evt-2", 5) is ClaimResult.NEW
    # The first claimant's callback ends late and fails: its release must not drop the
    # second claimant's live claim (a third delivery would run the callback alongside).
    await store.release("evt-2")
    assert await RedisDedupStore(redis).claim("evt-2", 5) is ClaimResult.RUNNING
    with pytest.raises(ValueError, match="retention"):
        RedisDedupStore(redis, retention=0)


async def test_an_item_waits_while_another_on_its_bag_is_unsettled(redis: Redis) -> None:
    """Item A on a bag is sent and unsettled (its worker died mid-send); item B on the
    same bag is handed back for later (it could claim A's refund), and runs once A has
    settled."""
    async with FakeViolet(orders=3, seed=1) as fake:
        worker, client = await _worker(fake, redis)
        try:
            first, second = _item(1, 100002, 300), _item(2, 100002, 400)
            ledger = worker.ledger
            for item in (first, second):
                await ledger.register(item_key(item), item)
            now = time.time()
            ask = sent_once(
                "refund",
                first.order_id,
                first.bag_id,
                first.request,
                now,
                baseline=frozenset(),
            )
            held = await worker.locks.acquire(first.bag_id)
            await ledger.mark_sent(item_key(first), ask, lock_key=held.key, token=held.token)
            await worker.locks.release(held)
            assert await ledger.open_on_bag(first.bag_id) == {item_key(first)}
            with pytest.raises(RetryLaterError, match="unsettled item"):
                await worker.run(
                    item_key(second), second, worker.ledger.sign(item_key(second), second)
                )
            assert fake.ledger.posts_per_bag.get(second.bag_id, []) == []
            await ledger.mark_failed(
                item_key(first), "X", "settled by hand", outcome="failed", bag_id=first.bag_id
            )
            result = await worker.run(
                item_key(second), second, worker.ledger.sign(item_key(second), second)
            )
            assert result["state"] == "applied"
            assert fake.ledger.refunds_per_bag[second.bag_id] == 1
        finally:
            await client.aclose()  # type: ignore[attr-defined]


async def test_an_altered_sent_record_is_held_for_review_not_resumed(redis: Redis) -> None:
    """Round 2, row 2: a Redis writer who rewrites a sent item's protocol record (a
    baseline naming the refund the send made, so a read-back would miss it and send
    again) or its request gets nothing sent: the item waits for review, pending, never
    reported failed (it may have applied)."""
    async with FakeViolet(orders=3, seed=1) as fake:
        worker, client = await _worker(fake, redis)
        try:
            ledger = worker.ledger
            for order_id, what in ((100001, "ask"), (100002, "request")):
                item = _item(1, order_id)
                key = item_key(item)
                await ledger.register(key, item)
                # Sent long enough ago that its settle window is over.
                sent_at = time.time() - 120
                ask = sent_once("refund", item.order_id, item.bag_id, item.request, sent_at)
                held = await worker.locks.acquire(item.bag_id)
                await ledger.mark_sent(key, ask, lock_key=held.key, token=held.token)
                async with fake.client() as dead_worker:  # the POST applied, then a crash
                    made = await dead_worker.refund_bag(item.order_id, item.bag_id, item.request)
                await worker.locks.release(held)
                if what == "ask":
                    forged = attrs.evolve(ask, baseline=frozenset({made.id}))
                    await redis.hset(ledger.record_key(key), "ask", orjson.dumps(forged.to_dict()))
                else:
                    await redis.hset(ledger.record_key(key), "request", '{"amount_refunded":499}')
                result = await worker.run(key, item, ledger.sign(key, item))
                assert (result["state"], result["needs_review"]) == ("pending", True), what
                assert "check the bag" in result["message"] or "refused" in result["message"]
                assert fake.ledger.refunds_per_bag[item.bag_id] == 1  # nothing re-sent
        finally:
            await client.aclose()  # type: ignore[attr-defined]


def test_arq_worker_settings_read_json_jobs_only() -> None:
    """Round 2, row 1: ``arq violet_async.fleet.WorkerSettings`` (read by arq from the
    class's ``__dict__``) deserializes JSON jobs and refuses a pickle unread."""
    import pickle

    from arq.worker import get_kwargs

    from violet_async.fleet import WorkerSettings, worker_settings
    from violet_async.fleet._arq import FleetConfig

    for settings in (get_kwargs(WorkerSettings), worker_settings(FleetConfig())):
        read = settings["job_deserializer"]
        assert read(settings["job_serializer"]({"f": "x", "a": [1]})) == {"f": "x", "a": [1]}
        with pytest.raises(ValueError, match="line 1 column 1"):
            read(pickle.dumps({"f": "x"}))
        with pytest.raises(TypeError, match="JSON object"):
            read(b"[1]")


async def test_a_job_cut_off_by_its_budget_is_run_again_not_dropped() -> None:
    """arq ends a job that outlives its ``job_timeout`` for good, leaving its item open
    in the ledger with no job to finish it (seen: one of 240 items ``new`` for ever in
    the three-worker run). The job's own budget ends first and asks arq for a re-run;
    the run it cut off is cancelled (its bag lock let go), not left behind."""
    from arq.worker import Retry

    from violet_async.fleet._arq import job_budget, refund_job

    assert job_budget(4.0) == 3.0
    assert job_budget(300.0) == 270.0
    assert job_budget(1.0) == 0.5
    for job_timeout in (0.5, 1.0, 2.0, 10.0, 300.0, 3600.0):
        assert job_timeout / 2 <= job_budget(job_timeout) < job_timeout

    started, cancelled = asyncio.Event(), asyncio.Event()

    class Stuck:
        async def run(self, key: str, item: object, signature: object) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

    ctx = {"violet_fleet": Stuck(), "violet_job_budget": 0.01}
    with pytest.raises(Retry) as retry:
        await refund_job(ctx, "refund:1:2:abc:0")
    assert started.is_set()
    assert cancelled.is_set()
    assert retry.value.defer_score == 1000

    class Done:
        async def run(self, key: str, item: object, signature: object) -> str:
            return key

    assert await refund_job({"violet_fleet": Done()}, "k") == "k"
    assert await refund_job({"violet_fleet": Done(), "violet_job_budget": 5.0}, "k") == "k"
