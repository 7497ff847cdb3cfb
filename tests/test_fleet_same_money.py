"""The fleet's edited rows: an item enqueued on a bag where the ledger holds an applied
(or sent, unsettled) item asking the same money of the bag (the batch runner's rule,
``same_money``) is held as already_present, at enqueue and again under the bag's lock
before a send. Real redis-server; our own server whose bag status never moves (so it
proves nothing) and which applies every refund it is sent; refunds counted from it."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from arq.connections import ArqRedis
from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, Timeouts
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
from violet_async.fleet._cli import _status
from violet_async.models import SkuRefund
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
TIMEOUTS = Timeouts(connect=1.0, read=2.0)


def _refund(amount: int | None, reason: str | None = None, **more: Any) -> BatchItem:
    return BatchItem.refund(
        1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=amount, reason=reason, **more)
    )


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    arq = await create_fleet_pool(redis_url)
    await arq.flushall()
    await RedisLedger(arq).new_fleet()
    try:
        yield arq
    finally:
        await arq.aclose()


def _lagging() -> Hostile:
    # The bag's status never moves after a refund: it proves nothing.
    return Hostile(FakeClock(), status_lag=10_000.0)


def _worker(client: Any, redis: Redis) -> FleetWorker:
    locks = BagLocks(redis, ttl=5.0, poll=0.01)
    return FleetWorker(client, RedisLedger(redis), locks, None, lock_wait=5.0)


async def _run(worker: FleetWorker, clock: FakeClock, key: str) -> dict[str, Any]:
    """Run ``key`` as arq would: again after each hand-back's defer (virtual time)."""
    for _ in range(20):
        try:
            return await worker.run(key)
        except RetryLaterError as exc:
            clock.advance(exc.defer)
    raise AssertionError(f"{key} did not end")


async def _applied_first(pool: ArqRedis, worker: FleetWorker, clock: FakeClock, item: Any) -> str:
    report = await enqueue(pool, [item], source="first.csv")
    assert report.queued == 1
    key = item_key(item)
    assert (await _run(worker, clock, key))["state"] == "applied"
    return key


async def test_a_reason_only_edit_after_applied_is_held_at_enqueue(pool: ArqRedis) -> None:
    server = _lagging()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        first = await _applied_first(pool, worker, server.clock, _refund(300, "dmaged"))
        edited = _refund(300, "damaged")
        report = await enqueue(pool, [edited], source="fixed.csv")
        assert (report.queued, report.held) == (0, 1)
        key = item_key(edited)
        # A job for it anyway (delivered twice, an older producer): still not sent.
        result = await _run(worker, server.clock, key)
    assert server.posts == 1
    assert len(server.ours) == 1
    assert result["state"] == "pending"
    assert result["outcome"] == "already_present"
    assert result["needs_review"] is True
    assert result["held_by"] == first
    assert result["refund_id"] == server.ours[0]
    # Enqueued again: still held, not queued.
    again = await enqueue(pool, [edited], source="fixed.csv")
    assert (again.queued, again.held) == (0, 1)
    out = io.StringIO()
    args = argparse.Namespace(redis=_url(pool), prefix="{violet}", json=False)
    assert await _status(args, out) == 0
    text = out.getvalue()
    assert f"fixed.csv:line 1: already_present (needs review) (held for {first})" in text
    assert f"refund {server.ours[0]}" in text
    assert "no job queued" not in text  # a held item is not an orphan to enqueue again


def _url(pool: ArqRedis) -> str:
    kwargs = pool.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


async def test_the_worker_holds_an_edit_the_enqueue_check_missed(pool: ArqRedis) -> None:
    """Registered past the enqueue check (an older producer, a ledger edited by hand):
    the worker's check under the bag's lock holds it."""
    server = _lagging()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        first = await _applied_first(pool, worker, server.clock, _refund(300, "a"))
        edited = _refund(300, "b", notify_customer=True)
        key = item_key(edited)
        await worker.ledger.register(key, edited)
        result = await _run(worker, server.clock, key)
    assert server.posts == 1
    assert (result["outcome"], result["held_by"]) == ("already_present", first)


@pytest.mark.parametrize(
    ("done", "new"),
    [(None, 300), (300, None)],
    ids=["whole-bag-then-its-amount", "amount-then-whole-bag"],
)
async def test_a_whole_bag_refund_and_the_same_amount_are_the_same_money(
    pool: ArqRedis, done: int | None, new: int | None
) -> None:
    server = _lagging()
    server.total = 300
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        first = await _applied_first(pool, worker, server.clock, _refund(done))
        edited = _refund(new)
        key = item_key(edited)
        await worker.ledger.register(key, edited)  # past the enqueue check: the worker's
        result = await _run(worker, server.clock, key)
    assert server.posts == 1
    assert (result["outcome"], result["held_by"]) == ("already_present", first)


async def test_another_amount_after_an_amount_is_new_money(pool: ArqRedis) -> None:
    server = _lagging()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        await _applied_first(pool, worker, server.clock, _refund(300, "x"))
        more = _refund(200, "x")
        report = await enqueue(pool, [more])
        assert (report.queued, report.held) == (1, 0)
        result = await _run(worker, server.clock, item_key(more))
    assert result["state"] == "applied"
    assert [r["amount"] for r in server.refunds] == [300, 200]
    assert server.posts == 2


async def test_two_edited_variants_at_once_on_two_workers_refund_once(
    pool: ArqRedis, redis_url: str
) -> None:
    """Two producers enqueue two edits of one row at once (neither sees the other
    applied); two workers take them at once. The bag's lock orders them: one refund,
    the other held."""
    server = _lagging()
    a, b = _refund(300, "first try"), _refund(300, "second try")
    other_pool = await create_fleet_pool(redis_url)
    reports = await asyncio.gather(
        enqueue(pool, [a], source="a.csv"), enqueue(other_pool, [b], source="b.csv")
    )
    assert sum(r.queued for r in reports) == 2
    async with (
        hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as c1,
        hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as c2,
    ):
        w1, w2 = _worker(c1, pool), _worker(c2, other_pool)
        results = await asyncio.gather(
            _run(w1, server.clock, item_key(a)), _run(w2, server.clock, item_key(b))
        )
    await other_pool.aclose()
    assert server.posts == 1
    assert len(server.ours) == 1
    assert sorted(r["outcome"] for r in results) == ["already_present", "applied"]


async def test_allow_repeat_sends_a_held_item(pool: ArqRedis) -> None:
    server = _lagging()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        await _applied_first(pool, worker, server.clock, _refund(300, "a"))
        edited = _refund(300, "b")
        assert (await enqueue(pool, [edited])).held == 1
        report = await enqueue(pool, [edited], allow_repeat=True)
        assert (report.queued, report.held) == (1, 0)
        result = await _run(worker, server.clock, item_key(edited))
        # A new row, allowed up front, is queued and sent too.
        third = _refund(300, "c")
        assert (await enqueue(pool, [third], allow_repeat=True)).queued == 1
        third_result = await _run(worker, server.clock, item_key(third))
    assert (result["state"], third_result["state"]) == ("applied", "applied")
    assert result["held_by"] is None
    assert server.posts == 3
    assert len(server.ours) == 3


async def test_a_forged_allow_repeat_is_not_one(pool: ArqRedis) -> None:
    """Someone with Redis but not the fleet key marks a held item allowed: held still."""
    server = _lagging()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        await _applied_first(pool, worker, server.clock, _refund(300, "a"))
        edited = _refund(300, "b")
        key = item_key(edited)
        await worker.ledger.register(key, edited)
        await pool.hset(worker.ledger.record_key(key), "repeat_sig", "0" * 64)
        result = await _run(worker, server.clock, key)
    assert server.posts == 1
    assert result["outcome"] == "already_present"


async def test_a_record_of_the_previous_version_fails_closed(pool: ArqRedis) -> None:
    """An applied refund of named lines (no amount) written before the ledger kept what
    it moved (no ``paid``), and before the bag's item set: a new row stating an amount
    may be that refund's amount written out. Held, not sent."""
    server = _lagging()
    lines = [SkuRefund(order_sku_id=1, quantity_refunded=1)]
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        old = _refund(None, skus=lines)
        first = await _applied_first(pool, worker, server.clock, old)
        ledger = worker.ledger
        await pool.hdel(ledger.record_key(first), "paid")
        await pool.delete(ledger.bag_items_key(BAG_ID))
        written_out = _refund(1000, skus=lines)
        key = item_key(written_out)
        await ledger.register(key, written_out)
        await pool.delete(ledger.bag_items_key(BAG_ID))
        result = await _run(worker, server.clock, key)
    assert server.posts == 1
    assert (result["outcome"], result["held_by"]) == ("already_present", first)


async def test_an_applied_refund_records_what_it_moved(pool: ArqRedis) -> None:
    """A refund of lines states no amount: the ledger keeps the amount Violet answered
    (``paid``), what tells its amount written out from other money."""
    server = _lagging()
    lines = [SkuRefund(order_sku_id=1, quantity_refunded=1)]
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        first = await _applied_first(pool, worker, server.clock, _refund(None, skus=lines))
        assert (await worker.ledger.get(first)).paid == 1000  # type: ignore[union-attr]
    assert server.posts == 1


async def test_the_cli_holds_an_edited_file_and_allow_repeat_sends_it(
    pool: ArqRedis, tmp_path: Any
) -> None:
    """The operator's path: a file applied, its reason fixed in place, enqueued again
    (held, said so), then with ``--allow-repeat`` (parsed as the CLI parses it)."""
    from violet_async.fleet import _cli as fleet_cli

    server = _lagging()
    rows = tmp_path / "rows.csv"
    rows.write_text(f"order_id,bag_id,amount_refunded,reason\n{ORDER_ID},{BAG_ID},300,dmaged\n")
    parser = argparse.ArgumentParser()
    fleet_cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["enqueue", str(rows), "--redis", _url(pool)])
    assert await fleet_cli._enqueue(args, io.StringIO(), io.StringIO()) == 0
    first = item_key(_refund(300, "dmaged"))
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        assert (await _run(worker, server.clock, first))["state"] == "applied"
        rows.write_text(
            f"order_id,bag_id,amount_refunded,reason\n{ORDER_ID},{BAG_ID},300,damaged\n"
        )
        out = io.StringIO()
        assert await fleet_cli._enqueue(args, out, io.StringIO()) == 0
        assert "0 queued" in out.getvalue()
        assert "1 held (already_present" in out.getvalue()
        edited = item_key(_refund(300, "damaged"))
        assert (await worker.ledger.get(edited)).held_by == first  # type: ignore[union-attr]
        again = parser.parse_args(["enqueue", str(rows), "--redis", _url(pool), "--allow-repeat"])
        out = io.StringIO()
        assert await fleet_cli._enqueue(again, out, io.StringIO()) == 0
        assert "1 queued" in out.getvalue()
        result = await _run(worker, server.clock, edited)
    assert result["state"] == "applied"
    assert len(server.ours) == 2


async def test_an_edit_while_the_first_is_unsettled_is_held_and_the_first_applies(
    pool: ArqRedis,
) -> None:
    """The first item's POST gets a 504 and commits later (pending, the bag's status
    never moves); its edited variant, enqueued and run meanwhile, is held (the first is
    sent and not settled), and the first then reads back as applied: one refund."""
    server = _lagging()
    server.script = [Step(504, body=GATEWAY_504, commit_after=2.5)]
    first, edited = _refund(300, "a"), _refund(300, "b")
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        assert (await enqueue(pool, [first])).queued == 1
        with pytest.raises(RetryLaterError) as parked:
            await worker.run(item_key(first))
        assert (await worker.ledger.get(item_key(first))).state == "pending"  # type: ignore[union-attr]
        report = await enqueue(pool, [edited])
        assert report.held == 1
        # Run anyway (a job of an older producer): the worker holds it too.
        held = await _run(worker, server.clock, item_key(edited))
        server.clock.advance(parked.value.defer)
        done = await _run(worker, server.clock, item_key(first))
    assert server.posts == 1
    assert len(server.ours) == 1
    assert (done["state"], done["refund_id"]) == ("applied", server.ours[0])
    assert (held["outcome"], held["held_by"]) == ("already_present", item_key(first))
    assert held["refund_id"] is None  # the first's refund was not known when it was held


async def test_an_unreadable_record_on_the_bag_holds_rather_than_sends(pool: ArqRedis) -> None:
    """A record on the bag whose request cannot be read (written by someone else) may
    be the same money: the new item is held, not sent."""
    server = _lagging()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, pool)
        first = await _applied_first(pool, worker, server.clock, _refund(300, "a"))
        await pool.hset(worker.ledger.record_key(first), "request", "{not json")
        other = _refund(200, "b")  # other money, were the record readable
        report = await enqueue(pool, [other])
        result = await _run(worker, server.clock, item_key(other))
    assert report.held == 1
    assert server.posts == 1
    assert (result["outcome"], result["held_by"]) == ("already_present", first)
    assert "cannot be read" in result["message"]
