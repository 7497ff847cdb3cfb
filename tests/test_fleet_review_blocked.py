"""An item whose bag is kept open only by items under review (``needs_review``, or a
record that cannot be read) is not retried for ever: no wait settles a review, a person
does. It ends not sent (*new*, outcome ``not_sent``), with a message naming the item
under review and what to do; ``status`` lists it; enqueued again once that item is
settled, it is sent exactly once. An item kept waiting by an item that is merely sent
and unsettled is still handed back for later. Real redis-server, FakeViolet and an arq
worker in this process; POSTs counted by the server."""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.worker import Worker

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, Timeouts
from violet_async._ask import sent_once
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetWorker,
    RedisLedger,
    RetryLaterError,
    create_fleet_pool,
    enqueue,
    item_key,
)
from violet_async.fleet._arq import QUEUE_NAME, FleetConfig, close_worker, job_id, worker_settings
from violet_async.fleet._cli import _status
from violet_async.testing import FakeClock, FakeViolet

from .hostile import BAG_ID as H_BAG
from .hostile import ORDER_ID as H_ORDER
from .hostile import Hostile, Step, hostile_client

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here

ORDER = 100001
BAG = ORDER + 100_000
SOURCE = "refunds.csv"
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
TIMEOUTS = Timeouts(connect=1.0, read=2.0)


def _item(line: int, amount: int) -> BatchItem:
    return BatchItem.refund(line, ORDER, BAG, RefundBagRequest(amount_refunded=amount))


REVIEWED = _item(1, 300)  # sent, then parked for review
BLOCKED = _item(2, 400)  # another refund of the same bag, new money
R_KEY, B_KEY = item_key(REVIEWED), item_key(BLOCKED)


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    arq = await create_fleet_pool(redis_url)
    await arq.flushall()
    await RedisLedger(arq).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield arq
    finally:
        await arq.aclose()


async def _sent(ledger: RedisLedger, locks: BagLocks, key: str, item: BatchItem) -> None:
    """``item`` registered and sent, as a worker records it before its POST leaves (its
    answer never came: nothing settles it yet)."""
    await ledger.register(key, item, source=SOURCE)
    ask = sent_once(
        "refund", item.order_id, item.bag_id, item.request, time.time(), baseline=frozenset()
    )
    held = await locks.acquire(item.bag_id)
    try:
        await ledger.mark_sent(key, ask, lock_key=held.key, token=held.token)
    finally:
        await locks.release(held)


async def _under_review(ledger: RedisLedger, locks: BagLocks) -> None:
    """REVIEWED sent and parked for review (conflicting evidence), as a worker leaves it."""
    await _sent(ledger, locks, R_KEY, REVIEWED)
    await ledger.mark_review(
        R_KEY, "the bag's refunds and the answer disagree; nothing more was sent: check the bag"
    )


def _posts(fake: FakeViolet) -> int:
    return len(fake.ledger.posts_per_bag.get(BAG, []))


async def _arq_burst(fake: FakeViolet, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Worker:
    """Run every queued job with arq's own worker (this process, burst mode)."""
    for name, value in (
        ("VIOLET_APP_ID", str(fake.app_id)),
        ("VIOLET_APP_SECRET", fake.app_secret),
        ("VIOLET_USERNAME", fake.username),
        ("VIOLET_PASSWORD", fake.password),
    ):
        monkeypatch.setenv(name, value)
    # Few tries: a job handed back again and again ends here, seen, never hangs.
    config = FleetConfig.from_env(redis_url=redis_url, base_url=fake.base_url, max_tries=3)
    worker = Worker(**worker_settings(config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await close_worker(worker)
    return worker


async def _status_of(redis_url: str, *, json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=json)
    code = await _status(args, out)
    return code, out.getvalue()


@pytest.mark.parametrize("settled_as", ["applied", "failed"])
async def test_an_item_blocked_by_a_review_item_ends_not_sent_and_runs_once_settled(
    pool: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch, settled_as: str
) -> None:
    """Its job runs once under arq and is not retried (it used to be handed back on
    every run until arq's tries ran out, with nothing in ``status``). It stays *new*,
    outcome ``not_sent``, with the review item's key and line and what to do; ``status``
    lists it (and not as an item without a job). Once a person settles the review item
    (applied: its refund was found on the bag; failed: it was not), the file enqueued
    again sends it exactly once; a third enqueue sends nothing."""
    ledger, locks = RedisLedger(pool), BagLocks(pool)
    async with FakeViolet(orders=2, seed=7) as fake:
        await _under_review(ledger, locks)
        report = await enqueue(pool, [BLOCKED], source=SOURCE)
        assert report.queued == 1
        worker = await _arq_burst(fake, redis_url, monkeypatch)
        assert (worker.jobs_complete, worker.jobs_retried, worker.jobs_failed) == (1, 0, 0)
        assert _posts(fake) == 0
        record = await ledger.get(B_KEY)
        assert record is not None
        assert (record.state, record.outcome, record.error) == ("new", "not_sent", "BagUnderReview")
        assert not record.needs_review
        message = record.message or ""
        assert f"({R_KEY}, line 1 of {SOURCE})" in message
        for words in ("under review", "Check the bag", "settle the item", "enqueue this file"):
            assert words in message

        code, text = await _status_of(redis_url)
        assert code == 0  # nothing failed
        assert f"{SOURCE}:line 2: not_sent: order {ORDER} bag {BAG}: BagUnderReview" in text
        assert R_KEY in text.split(f"{SOURCE}:line 2:")[1]
        assert f"{SOURCE}:line 1: pending (needs review)" in text
        # Not an item without a job to enqueue again: enqueuing it now changes nothing.
        assert f"  {B_KEY}\n" not in text
        _, raw = await _status_of(redis_url, json=True)
        problems = {p["key"]: p for p in orjson.loads(raw)["problems"]}
        assert problems[B_KEY]["outcome"] == "not_sent"
        assert problems[B_KEY]["state"] == "new"
        assert B_KEY not in orjson.loads(raw)["without_job"]

        # A person checks the bag and settles the item under review.
        if settled_as == "applied":
            made = fake.another_actor_refund(ORDER, BAG, 300, status="COMPLETED")
            await ledger.mark_applied(
                R_KEY, BAG, int(made["id"]), reconciled=True, outcome="reconciled", paid=300
            )
        else:
            await ledger.mark_failed(
                R_KEY, "Checked", "not on the bag", outcome="failed", bag_id=BAG
            )

        again = await enqueue(pool, [REVIEWED, BLOCKED], source=SOURCE)
        assert (again.queued, again.already_finished) == (1, 1)
        worker = await _arq_burst(fake, redis_url, monkeypatch)
        assert (worker.jobs_complete, worker.jobs_retried) == (1, 0)
        assert _posts(fake) == 1
        done = await ledger.get(B_KEY)
        assert done is not None
        assert (done.state, done.outcome) == ("applied", "applied")
        assert (done.error, done.message) == (None, None)  # nothing stale from the block
        assert await ledger.blocked() == []

        third = await enqueue(pool, [REVIEWED, BLOCKED], source=SOURCE)
        assert (third.queued, third.already_finished) == (0, 2)
        await _arq_burst(fake, redis_url, monkeypatch)
        assert _posts(fake) == 1
        assert fake.ledger.refunds_per_bag[BAG] == 1
        code, text = await _status_of(redis_url)
        assert "not_sent" not in text


async def _fleet_worker(fake: FakeViolet, redis: Any, ledger: RedisLedger | None = None) -> Any:
    client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2, settle_delay=0.05))
    await client.__aenter__()
    worker = FleetWorker(client, ledger or RedisLedger(redis), BagLocks(redis), None)
    return worker, client


async def _run(worker: FleetWorker, key: str, item: BatchItem) -> dict[str, Any]:
    return await worker.run(key, item, worker.ledger.sign(key, item))


async def test_an_item_kept_by_a_merely_unsettled_item_is_still_retried(pool: ArqRedis) -> None:
    """The item keeping the bag open is sent and unsettled, not under review (its
    worker died mid-send; its own job reads it back later): the other item is handed
    back for later, as before, and not marked. So is one kept by a review item and an
    unsettled one together, and one kept by an item whose record is missing (its job
    may register it again)."""
    async with FakeViolet(orders=2, seed=7) as fake:
        worker, client = await _fleet_worker(fake, pool)
        try:
            ledger = worker.ledger
            await _sent(ledger, worker.locks, R_KEY, REVIEWED)
            await ledger.register(B_KEY, BLOCKED, source=SOURCE)
            for _ in range(2):
                with pytest.raises(RetryLaterError, match="unsettled item"):
                    await _run(worker, B_KEY, BLOCKED)
            other = _item(3, 200)
            await ledger.mark_review(R_KEY, "conflicting evidence")
            await _sent(ledger, worker.locks, item_key(other), other)  # unsettled, no review
            with pytest.raises(RetryLaterError, match="unsettled item"):
                await _run(worker, B_KEY, BLOCKED)
            await ledger.mark_failed(item_key(other), "X", "by hand", outcome="failed", bag_id=BAG)
            await ledger.mark_failed(R_KEY, "X", "by hand", outcome="failed", bag_id=BAG)
            await pool.sadd(ledger.bag_open_key(BAG), "refund:1:2:3:0")  # no record
            with pytest.raises(RetryLaterError, match="unsettled item"):
                await _run(worker, B_KEY, BLOCKED)
            record = await ledger.get(B_KEY)
            assert record is not None
            assert (record.state, record.outcome, record.message) == ("new", None, None)
            assert await ledger.blocked() == []
            assert _posts(fake) == 0
        finally:
            await client.aclose()


async def test_an_unreadable_record_keeping_the_bag_counts_as_under_review(
    pool: ArqRedis, redis_url: str
) -> None:
    """A record on the bag's open set that cannot be read (its request edited into
    something no worker parses) is never moved on by a worker: the item ends not sent,
    naming it, rather than waiting for ever. Its text (written by anyone) is quoted
    bounded, and ``status`` prints it escaped."""
    async with FakeViolet(orders=2, seed=7) as fake:
        worker, client = await _fleet_worker(fake, pool)
        try:
            ledger = worker.ledger
            await _sent(ledger, worker.locks, R_KEY, REVIEWED)
            await pool.hset(
                ledger.record_key(R_KEY),
                mapping={"request": "{not json", "source": "x\x1b[2J" + "y" * 500},
            )
            # Enqueued with --allow-repeat: without it, the unreadable record is taken
            # as maybe the same money and the item held as already_present (for review).
            await ledger.register(B_KEY, BLOCKED, source=SOURCE, allow_repeat=True)
            result = await _run(worker, B_KEY, BLOCKED)
        finally:
            await client.aclose()
    assert (result["state"], result["outcome"]) == ("new", "not_sent")
    message = result["message"]
    assert f"whose ledger record cannot be read ({R_KEY}, line 1 of x" in message
    assert "y" * 190 in message
    assert "y" * 201 not in message
    assert _posts(fake) == 0
    _, text = await _status_of(redis_url)
    assert "\x1b" not in text
    assert f"{SOURCE}:line 2: not_sent" in text


class _SettledMeanwhile(RedisLedger):
    """A ledger on which a person settles the review item right as the worker marks the
    blocked item (after its check, before its look again)."""

    async def mark_blocked(self, key: str, message: str, **lock: Any) -> None:
        await super().mark_blocked(key, message, **lock)
        await self.mark_failed(R_KEY, "Checked", "not on the bag", outcome="failed", bag_id=BAG)


async def test_a_review_settled_while_the_item_is_marked_runs_it_again(pool: ArqRedis) -> None:
    """The review item is settled between the worker's check and its mark: the worker
    looks again after the mark and hands the job back (arq runs it again soon), and the
    next run finds the bag free, clears the mark and sends once."""
    async with FakeViolet(orders=2, seed=7) as fake:
        ledger = _SettledMeanwhile(pool)
        worker, client = await _fleet_worker(fake, pool, ledger)
        try:
            await _under_review(ledger, worker.locks)
            await ledger.register(B_KEY, BLOCKED, source=SOURCE)
            with pytest.raises(RetryLaterError, match="changed; run again"):
                await _run(worker, B_KEY, BLOCKED)
            assert _posts(fake) == 0
            result = await _run(worker, B_KEY, BLOCKED)
            again = await _run(worker, B_KEY, BLOCKED)  # delivered twice
        finally:
            await client.aclose()
    assert (result["state"], result["error"], result["message"]) == ("applied", None, None)
    assert again["state"] == "applied"
    assert _posts(fake) == 1
    assert fake.ledger.refunds_per_bag[BAG] == 1


async def test_a_blocked_item_delivered_again_while_the_review_stands_sends_nothing(
    pool: ArqRedis,
) -> None:
    """Its job delivered again (or enqueued again too early), two workers at once: each
    run ends not sent again, nothing leaves; a marker a Redis writer forged on an item
    that is not blocked (its record applied) is not listed by ``status``."""
    async with FakeViolet(orders=2, seed=7) as fake:
        first, client_a = await _fleet_worker(fake, pool)
        second, client_b = await _fleet_worker(fake, pool)
        try:
            await _under_review(first.ledger, first.locks)
            await first.ledger.register(B_KEY, BLOCKED, source=SOURCE)
            results = [await _run(w, B_KEY, BLOCKED) for w in (first, second, first)]
            assert [(r["state"], r["outcome"]) for r in results] == [("new", "not_sent")] * 3
            assert _posts(fake) == 0
            assert [r.key for r in await first.ledger.blocked()] == [B_KEY]
            await pool.sadd(first.ledger.blocked_key, R_KEY)  # not blocked: under review
            assert [r.key for r in await first.ledger.blocked()] == [B_KEY]
        finally:
            await client_a.aclose()
            await client_b.aclose()


async def _until_ended(worker: FleetWorker, clock: FakeClock, key: str) -> dict[str, Any]:
    """Run ``key``'s job as arq would: again after each hand-back's defer (virtual
    time), its job gone once it returns (``keep_result=0``)."""
    for _ in range(30):
        try:
            result = await worker.run(key)
        except RetryLaterError as exc:
            clock.advance(exc.defer)
            continue
        await worker.ledger.redis.delete(job_key_prefix + job_id(key))
        await worker.ledger.redis.zrem(QUEUE_NAME, job_id(key))
        return result
    raise AssertionError(f"{key} did not end")


async def test_a_review_the_worker_itself_parked_blocks_the_bag_on_a_hostile_server(
    pool: ArqRedis,
) -> None:
    """Our own server: the first item's POST is answered 200 with a body that cannot be
    read, and its refund never shows (the worker parks it for review). A refund of new
    money on the bag then ends not sent with no request at all (no read, no POST); an
    edited row of the parked item (same money, its reason fixed) is held as
    already_present, as before, never taken for blocked. Settled by a person (the bag
    shows no refund: failed), the file enqueued again sends the new money once."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, garbled=True, commit_after=None), Step(200)])
    parked = BatchItem.refund(1, H_ORDER, H_BAG, RefundBagRequest(amount_refunded=300))
    new_money = BatchItem.refund(2, H_ORDER, H_BAG, RefundBagRequest(amount_refunded=400))
    edited = BatchItem.refund(
        3, H_ORDER, H_BAG, RefundBagRequest(amount_refunded=300, reason="damaged")
    )
    p_key, n_key, e_key = item_key(parked), item_key(new_money), item_key(edited)
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = FleetWorker(client, RedisLedger(pool), BagLocks(pool, ttl=5.0, poll=0.01))
        await enqueue(pool, [parked], source=SOURCE)
        first = await _until_ended(worker, clock, p_key)
        assert (first["state"], first["needs_review"]) == ("pending", True)
        assert server.posts == 1
        report = await enqueue(pool, [parked, new_money, edited], source=SOURCE)
        assert (report.queued, report.held) == (2, 1)  # the edit is held at enqueue
        reads = server.reads
        blocked = await _until_ended(worker, clock, n_key)
        held = await _until_ended(worker, clock, e_key)
        assert (server.posts, server.reads) == (1, reads)  # nothing asked of Violet
        assert (blocked["state"], blocked["outcome"]) == ("new", "not_sent")
        assert f"({p_key}, line 1 of {SOURCE})" in blocked["message"]
        assert (held["outcome"], held["held_by"]) == ("already_present", p_key)

        await worker.ledger.mark_failed(
            p_key, "Checked", "not on the bag", outcome="failed", bag_id=H_BAG
        )
        again = await enqueue(pool, [parked, new_money], source=SOURCE)
        assert (again.queued, again.already_finished) == (1, 1)
        done = await _until_ended(worker, clock, n_key)
        twice = await _until_ended(worker, clock, n_key)  # its job delivered twice
    assert (done["state"], done["refund_id"], done["error"]) == ("applied", server.ours[0], None)
    assert twice["refund_id"] == done["refund_id"]
    assert server.posts == 2
    assert [r["amount"] for r in server.refunds] == [400]


def test_the_simulator_reads_a_blocked_summary_as_not_sent() -> None:
    """The simulator's worker mode tells its checks what a job's caller learns: an item
    left not sent for a review is "not_sent" (checked: nothing applied for it), never
    "review" (which would claim it may have applied)."""
    from violet_async.testing.sim._fleet import _seen

    summary = {"state": "new", "outcome": "not_sent", "error": "BagUnderReview", "message": "m"}
    seen = _seen(None, "a1", BLOCKED, summary, None)
    assert (seen.label, seen.what, seen.pending) == ("a1", "not_sent", None)
    assert seen.error == "BagUnderReview: m"
