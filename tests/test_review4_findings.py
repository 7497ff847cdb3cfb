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
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

if not os.environ.get("CI"):
    pytest.importorskip("redis")

import attrs
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, Timeouts, VioletClient
from violet_async._ask import sent_once
from violet_async.batch import BatchItem, BatchResult, run_batch
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, RetryLaterError, item_key
from violet_async.fleet._ledger import sign_item
from violet_async.testing import FakeClock

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here


def _sig(key: str, item: BatchItem) -> str:
    """The producer's signature of ``item`` under ``key`` (the tests' fleet key)."""
    return sign_item(_fleet_redis.FLEET_KEY.encode(), key, item)


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
        self.hang = False
        self.gate: asyncio.Event | None = None
        """Set: a POST waits for it, then answers 504 without committing."""
        """Commit at once, then never answer (a run killed with its POST in flight)."""
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
        if amount > 1000:
            message = f"Refund of {amount} exceeds the 1000 left on bag {bag}"
            return web.json_response(
                {"status": 400, "message": message, "error_code": 4006}, status=400
            )
        if self.gate is not None:
            await self.gate.wait()
            return web.Response(status=504, text="gateway timeout")
        if self.late:
            self.clock.call_later(self.late.pop(0), lambda: self.commit(amount, bag))
            await self.stop.wait()
            return web.Response(status=504)
        record = self.commit(amount, bag)
        if self.hang:
            await self.stop.wait()
            return web.Response(status=504)
        return web.json_response(record)

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
                running = asyncio.ensure_future(first.run(key, item, _sig(key, item)))
                await violet.arrived.wait()
                await redis.flushall()  # Redis restarted with nothing
                running.cancel()  # ... and worker A went with it
                await asyncio.gather(running, return_exceptions=True)
            async with _client(url, clock) as c_client:
                # Worker C meets the lost ledger first (another item): the new epoch.
                with contextlib.suppress(RetryLaterError):
                    await _worker(c_client, redis).run(other_key, other, _sig(other_key, other))
            async with _client(url, ahead) as b_client:
                b = _worker(b_client, redis)
                with contextlib.suppress(RetryLaterError):
                    await b.run(key, item, _sig(key, item))
                clock.advance(60.0)  # A's POST lands
                ahead.advance(60.0)
                result = await b.run(key, item, _sig(key, item))  # arq runs it again after the hold
    finally:
        await redis.aclose()
    assert [r["bag_id"] for r in violet.refunds].count(BAG) == 1, violet.refunds
    assert result["outcome"] == "already_present"


async def _killed_mid_post(
    url: str, clock: FakeClock, violet: Violet, item: BatchItem, journal: Path
) -> None:
    """Run ``item`` and kill the run (as kill -9 would: nothing more written) while its
    POST is in flight; the server committed it."""
    async with _client(url, clock) as client:
        run = asyncio.ensure_future(_drain(run_batch(client, [item], journal=journal)))
        await violet.arrived.wait()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    violet.hang = False


async def _drain(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [r async for r in results]


def _corrupt_last_ask(journal: Path) -> None:
    """The last line's protocol record made unreadable (a field of the wrong type), its
    bag still named: a journal written by another build, or edited by hand."""
    lines = journal.read_bytes().splitlines()
    record = orjson.loads(lines[-1])
    assert record["state"] == "sent"
    record["ask"]["sends"] = "many"
    lines[-1] = orjson.dumps(record)
    journal.write_bytes(b"\n".join(lines) + b"\n")


async def test_an_unreadable_earlier_entry_on_the_bag_keeps_an_edited_row_from_sending(
    tmp_path: Path,
) -> None:
    """A run is killed with a row's POST in flight (it applied); the journal's record of
    that send cannot be read back (a field of the wrong type); the operator fixes the
    row's amount (300 -> 350) and runs again. The earlier entry may have applied and
    cannot be resolved: the edited row must not be sent (its bag is unresolved). It
    used to be ignored as if the bag had nothing open: two refunds."""
    clock = FakeClock()
    violet = Violet(clock)
    violet.hang = True
    journal = tmp_path / "run.jsonl"
    typo = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    fixed = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=350))
    async with serving(violet) as url:
        await _killed_mid_post(url, clock, violet, typo, journal)
        _corrupt_last_ask(journal)
        async with _client(url, clock) as client:
            results = await _drain(run_batch(client, [fixed], journal=journal))
            again = await _drain(run_batch(client, [fixed], journal=journal))
    assert len(violet.refunds) == 1, violet.refunds
    assert [r.outcome for r in results] == ["not_sent"]
    assert "cannot be read" in str(results[0].error)
    assert [r.outcome for r in again] == ["not_sent"]  # still unresolved: still not sent


class DyingRedis(Redis):
    """A Redis client whose worker dies (every later command fails) right after the
    first script call that writes ``die_on`` as an argument."""

    die_on: bytes | None = None
    dead = False

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.dead:
            raise RedisConnectionError("the worker is dead (test)")
        result = await super().execute_command(*args, **options)
        named = (a if isinstance(a, bytes) else str(a).encode() for a in args)
        if self.die_on is not None and args[0] == "EVALSHA" and self.die_on in named:
            self.dead = True
        return result


async def test_a_worker_dying_right_after_marking_an_item_failed_leaves_its_bag_usable(
    redis_url: str,
) -> None:
    """Violet refuses an item (400: final) and its worker dies right after the ledger
    write of "failed", before the bag's open set forgets it. Another item on the bag
    must still run: the failed item is terminal and never runs again to clean up. It
    used to be handed back ("an unsettled item") on every run, for ever."""
    first = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=5000))
    second = BatchItem.refund(2, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    clock = FakeClock()
    violet = Violet(clock)
    dying = DyingRedis.from_url(redis_url)
    healthy = Redis.from_url(redis_url)
    await healthy.flushall()
    await RedisLedger(healthy).new_fleet()
    try:
        async with serving(violet) as url:
            async with _client(url, clock) as client:
                worker = _worker(client, dying)
                await worker.ledger.register(item_key(first), first)
                dying.die_on = b"failed"
                with pytest.raises(RedisError):
                    await worker.run(item_key(first), first, _sig(item_key(first), first))
            record = await RedisLedger(healthy).get(item_key(first))
            assert record is not None
            assert record.state == "failed"
            await healthy.delete(BagLocks(healthy).key(BAG))  # the dead worker's lock expired
            async with _client(url, clock) as client:
                other = _worker(client, healthy)
                await other.ledger.register(item_key(second), second)
                result: dict[str, Any] | None = None
                why = ""
                for _ in range(5):
                    try:
                        result = await other.run(
                            item_key(second), second, _sig(item_key(second), second)
                        )
                        break
                    except RetryLaterError as exc:
                        why = str(exc)
                        clock.advance(exc.defer)
    finally:
        await dying.aclose()
        await healthy.aclose()
    assert result is not None, why
    assert result["state"] == "applied"
    assert len(violet.refunds) == 1


async def test_a_job_whose_copy_of_the_item_is_another_item_is_not_run(redis_url: str) -> None:
    """The ledger lost item K (a refund of 300); a job planted in Redis names K but
    carries a copy of another item (a refund of 900). The copy must be K's own (its
    kind, order, bag and request are in K) or nothing is run: it used to be registered
    under K and sent, 900 for a 300 asked."""
    asked = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    planted = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=900))
    clock = FakeClock()
    violet = Violet(clock)
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    await RedisLedger(redis).new_fleet()
    try:
        async with serving(violet) as url, _client(url, clock) as client:
            worker = _worker(client, redis)
            # Signed by a holder of the fleet key (a producer's bug): the copy must still
            # be the item its key names. Unsigned, it is refused before this check.
            with pytest.raises(LookupError, match="not this item"):
                await worker.run(item_key(asked), planted, _sig(item_key(asked), planted))
            assert await worker.ledger.get(item_key(asked)) is None
            # The item's own copy runs (the occurrence suffix is not part of the check).
            key = item_key(asked, occurrence=1)
            result = await worker.run(key, asked, _sig(key, asked))
    finally:
        await redis.aclose()
    assert result["state"] == "applied"
    assert [r["amount"] for r in violet.refunds] == [300]


async def test_a_worker_that_lost_its_lock_cannot_overwrite_the_new_holders_record(
    redis_url: str,
) -> None:
    """Worker A's POST is in flight when A stalls past its lock's TTL; worker B takes
    the bag's lock and records a send of its own (a second send, later). A wakes to a
    504 and goes pending: its write must not replace B's record (the ledger would
    forget B's send and its later settle window, and a resume could prove absence
    before B's POST landed). Every write of a send's record checks the lock."""
    item = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    key = item_key(item)
    clock = FakeClock()
    violet = Violet(clock)
    violet.gate = asyncio.Event()
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    ledger = RedisLedger(redis)
    await ledger.new_fleet()
    locks = BagLocks(redis, ttl=5.0, poll=0.02)
    try:
        async with serving(violet) as url, _client(url, clock) as client:
            worker = FleetWorker(client, ledger, locks, None, patience=0.0)
            await ledger.register(key, item)
            running = asyncio.ensure_future(worker.run(key, item, _sig(key, item)))
            await violet.arrived.wait()
            # A's lock expired while it stalled; B took it and sent again, later.
            await redis.set(locks.key(BAG), "worker-b-token")
            b_ask = sent_once("refund", ORDER, BAG, item.request, clock.time() + 50.0)
            b_ask = attrs.evolve(b_ask, sends=2)
            await ledger.mark_sent(key, b_ask, lock_key=locks.key(BAG), token="worker-b-token")
            violet.gate.set()  # A wakes: its POST answers 504
            with contextlib.suppress(RetryLaterError):
                await running
            record = await ledger.get(key)
    finally:
        await redis.aclose()
    assert record is not None
    assert record.ask is not None
    assert (record.ask["sends"], record.ask["last_sent_at"]) == (2, b_ask.last_sent_at)


async def test_a_settled_item_left_in_a_bags_open_set_is_dropped(redis_url: str) -> None:
    """A ledger written by an older worker that died between "failed" and leaving the
    bag's open set: the next item on the bag drops the settled one and runs."""
    done = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=5000))
    item = BatchItem.refund(2, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    clock = FakeClock()
    violet = Violet(clock)
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    ledger = RedisLedger(redis)
    await ledger.new_fleet()
    try:
        await ledger.register(item_key(done), done)
        await ledger.mark_failed(item_key(done), "BadRequestError", "refused", outcome="failed")
        await redis.sadd(ledger.bag_open_key(BAG), item_key(done))  # left behind
        await ledger.register(item_key(item), item)
        async with serving(violet) as url, _client(url, clock) as client:
            result = await _worker(client, redis).run(
                item_key(item), item, _sig(item_key(item), item)
            )
        assert await ledger.open_on_bag(BAG) == set()
    finally:
        await redis.aclose()
    assert result["state"] == "applied"
    assert len(violet.refunds) == 1
