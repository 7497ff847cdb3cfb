"""After Redis lost the ledger, an item run again from its job's copy that ends in a
definite error is not "failed": it may have applied before the loss (the refund the bag
was refused for may be its own). On a real redis-server and our own scripted server;
the simulator's seed 3150 (``redis_loss``) is the same class."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import attrs
import orjson
import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import VioletClient
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, RetryLaterError
from violet_async.fleet._ledger import keyed_items
from violet_async.testing import FakeClock
from violet_async.testing.sim import WORLD_KINDS, simulate

from .hostile import APP_ID, BAG_ID, SECRET, Hostile, Step, hostile_client, serve
from .test_issue24_fleet import ITEM, KEY, ROOMY, TIMEOUTS, _until_done

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key

REFUSED = orjson.dumps(
    {
        "status": 400,
        "message": f"Bag {BAG_ID} is REFUNDED and cannot be refunded",
        "error_code": 4000,
    }
)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()
    try:
        yield client
    finally:
        await client.aclose()


def _client(url: str, clock: FakeClock) -> VioletClient:
    """A worker process's own client of ``url`` (its own known refunds)."""
    return VioletClient(
        APP_ID,
        SECRET,
        username="hostile-user",
        password="hostile-password-0123",
        base_url=url,
        clock=clock,
        retry=ROOMY,
        timeouts=TIMEOUTS,
    )


def _worker(client: Any, redis: Redis) -> FleetWorker:
    return FleetWorker(client, RedisLedger(redis), BagLocks(redis, ttl=1.0, poll=0.02))


@pytest.mark.parametrize("lost", [True, False], ids=["after a loss", "no loss"])
async def test_a_refusal_after_the_ledger_was_lost_is_review_not_failed(
    redis: Redis, lost: bool
) -> None:
    """The item applied (200); Redis restarted empty; its job ran again from its own
    copy. The bag's list comes from a replica far behind, so the read before the send
    does not show the refund, and the send is refused (400: the bag is refunded). That
    refusal proves nothing about the send before the loss: review, nothing more sent.
    Without the loss the same refusal of a first send is a definite failure. (The job
    is taken by another worker process: the one that made the refund still knows it as
    the item's, and records it again with no request.)"""
    clock = FakeClock()
    script = [Step(400, body=REFUSED, commit_after=None)]
    if lost:
        script.insert(0, Step(200))
    server = Hostile(clock, script=script, replica_behind=10_000.0)
    async with serve(server) as url:
        if lost:
            async with _client(url, clock) as before:
                worker = _worker(before, redis)
                await worker.ledger.register(KEY, ITEM)  # the producer enqueued it
                first = await _until_done(worker, clock)
                assert first["state"] == "applied"
            await redis.flushall()  # Redis restarted with nothing
        async with _client(url, clock) as client:
            worker = _worker(client, redis)
            if not lost:
                await worker.ledger.register(KEY, ITEM)  # the producer enqueued it
            result = await _until_done(worker, clock)
            record = await worker.ledger.get(KEY)
    assert record is not None
    assert server.posts == (2 if lost else 1)
    assert len(server.ours) == (1 if lost else 0)
    if lost:
        assert (result["state"], result["needs_review"]) == ("pending", True)
        assert "lost" in (result["message"] or "")
        assert "BadRequestError" in result["message"] or "400" in result["message"]
        assert record.restored
        # Another run (the job delivered again) sends nothing more.
        again = await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
        assert again["needs_review"]
        assert server.posts == 2
    else:
        assert (result["state"], result["outcome"]) == ("failed", "failed")
        assert not record.restored


def test_the_simulators_seed_of_a_refused_token_after_a_loss_holds() -> None:
    """Seed 3150 (``redis_loss``, worker mode): a cancel applied, Redis lost the ledger,
    and the job's run again from its copy ended in a refused token: reported failed for
    a cancel that applied. Now review, with the ledger's reason."""
    result = simulate(3150, mode="worker", kinds={"redis_loss"})
    assert result.ok, result.report()
    assert result.outcomes["review"] >= 1


class _LosesAfterApplied(RedisLedger):
    """A ledger whose Redis restarts empty right after the item's applied write: the
    applied write's round trip flushes Redis between that write and the read back (a
    script run in its place, once)."""

    lost = False

    async def mark_applied_and_read(
        self, *args: Any, then: Any = (), **kwargs: Any
    ) -> tuple[int, Any]:
        if not self.lost:
            self.lost = True
            flush = self.redis.register_script("return redis.call('FLUSHALL')")
            then = [*then, (flush, [], [])]
        return await super().mark_applied_and_read(*args, then=then, **kwargs)


async def test_a_loss_right_after_the_applied_write_runs_the_job_again(redis: Redis) -> None:
    """Redis lost the ledger between the item's applied write and the read of its
    summary. That read used to raise LookupError ("vanished"), which arq takes as a
    failed job, never run again: the item was dropped with its record. Now the job is
    handed back (RetryLaterError, after the fleet's hold) and its re-run records the
    refund this worker got again, with no second request."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200)])
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        ledger = _LosesAfterApplied(redis)
        worker = FleetWorker(client, ledger, BagLocks(redis, ttl=1.0, poll=0.02))
        await ledger.register(KEY, ITEM)
        with pytest.raises(RetryLaterError, match="vanished") as handed_back:
            await worker.run(KEY, ITEM, ledger.sign(KEY, ITEM))
        assert handed_back.value.defer >= ROOMY.settle_running
        clock.advance(handed_back.value.defer)
        result = await _until_done(worker, clock)
    assert (result["state"], result["refund_id"]) == ("applied", server.ours[0])
    assert server.posts == 1


def test_the_simulators_seed_of_a_loss_mid_run_holds() -> None:
    """Seed 700179 (worker mode, every kind): Redis lost the ledger while the worker's
    jobs ran; FleetWorker.run raised LookupError ("vanished") and the jobs were dropped
    (the simulator swallowed it then; a job's exception is a violation now)."""
    result = simulate(700179, mode="worker", kinds=set(WORLD_KINDS))
    assert result.ok, result.report()
    assert sum(result.outcomes.values()) == len(result.schedule.asks)


async def _until_done_item(
    worker: FleetWorker, clock: FakeClock, key: str, item: BatchItem
) -> dict[str, Any]:
    """Run ``item`` as arq would: again after each hand-back's defer (virtual time)."""
    for _ in range(10):
        try:
            return await worker.run(key, item, worker.ledger.sign(key, item))
        except RetryLaterError as exc:
            clock.advance(exc.defer)
    raise AssertionError("the item did not end in 10 runs")


@pytest.mark.parametrize("behind", [0.0, 10_000.0], ids=["list current", "replica far behind"])
async def test_the_worker_that_made_the_refund_runs_the_item_again_after_a_loss(
    redis: Redis, behind: float
) -> None:
    """The item applied (200, refund A) in a worker; Redis restarted empty; the job,
    enqueued again, is taken by the same worker an hour later. Its client knows A as
    the item's own (every run of one item is one owner), so it records A again, with
    no request, whether or not the bag's list shows A yet. It used to take A for
    another call's refund (handed to the item's first ask) and send a second 3.00."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200), Step(200)], replica_behind=behind)
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, redis)
        await worker.ledger.register(KEY, ITEM)
        first = await _until_done(worker, clock)
        assert first["state"] == "applied"
        await redis.flushall()  # Redis restarted with nothing
        clock.advance(3600.0)
        again = await _until_done(worker, clock)
        record = await worker.ledger.get(KEY)
    assert server.posts == 1
    assert len(server.ours) == 1
    assert (again["state"], again["refund_id"]) == ("applied", first["refund_id"])
    assert record is not None
    assert record.restored


async def test_two_identical_items_keep_their_own_refunds_in_one_worker_after_a_loss(
    redis: Redis,
) -> None:
    """Two identical rows of one file are two items (occurrence 0 and 1), each with its
    own refund (A, B) from one worker. After Redis lost the ledger the same worker runs
    both again: each gets its own refund back (never the other's), and nothing is sent."""
    clock = FakeClock()
    server = Hostile(clock, total=10_000, script=[Step(200), Step(200), Step(200)])
    items = list(keyed_items([ITEM, attrs.evolve(ITEM, line=2)]))
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, redis)
        for key, item in items:
            await worker.ledger.register(key, item)
        made = [(await _until_done_item(worker, clock, *pair))["refund_id"] for pair in items]
        assert server.posts == 2
        assert len(set(made)) == 2
        await redis.flushall()  # Redis restarted with nothing
        clock.advance(3600.0)
        again = [(await _until_done_item(worker, clock, *pair))["refund_id"] for pair in items]
    assert server.posts == 2
    assert again == made


def test_the_simulators_seed_of_the_same_worker_after_a_loss_holds() -> None:
    """Seed 28 (``redis_loss``, worker mode, ``loss_same_worker``): the first worker took
    the jobs again after the loss, and sent a second refund for an item it had applied.
    The simulator reaches it since it runs finished jobs again on the same worker."""
    result = simulate(28, mode="worker", kinds={"redis_loss"})
    assert result.schedule.loss_same_worker
    assert result.ok, result.report()


async def test_a_refund_that_moved_no_money_is_not_claimed_again_after_a_loss(
    redis: Redis,
) -> None:
    """The item's refund came back FAILED (no money moved: the item failed). After
    Redis lost the ledger the same worker runs the job again: that refund is not the
    item's outcome to claim again (it would park the item for review); the run asks
    anew, as a fresh worker does, and the refund applies once."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, answer={"status": "FAILED"}), Step(200)])
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, redis)
        await worker.ledger.register(KEY, ITEM)
        first = await _until_done(worker, clock)
        assert (first["state"], first["error"]) == ("failed", "RefundFailedError")
        server.refunds[0]["status"] = "FAILED"  # the list says so too
        await redis.flushall()  # Redis restarted with nothing
        clock.advance(3600.0)
        again = await _until_done(worker, clock)
    assert server.posts == 2
    assert again["state"] == "applied"
    assert again["refund_id"] == server.ours[1]
