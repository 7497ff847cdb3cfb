"""Never twice across a fleet, on a real redis-server and our own hostile server: Redis
away as a POST's answer arrives, a worker dying between the ledger's writes, and a
Redis that restarts empty with a POST in flight."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, Timeouts
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetWorker,
    NonDurableRedisError,
    RedisLedger,
    RetryLaterError,
    item_key,
)
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
TIMEOUTS = Timeouts(connect=1.0, read=2.0)
ITEM = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
KEY = item_key(ITEM)


class FlakyRedis(Redis):
    """A Redis client that can go away: ``down`` makes every command fail as a lost
    connection would; ``die_after`` (bytes) takes it down for good right after the first
    write (SADD, or a script) naming a key that contains them (a worker dying there).
    A pipeline is one round trip: sent whole, it runs whole, and a death after one of
    its writes loses its answers."""

    down = False
    die_after: bytes | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.down:
            raise RedisConnectionError("Redis is away (test)")
        result = await super().execute_command(*args, **options)
        if self._dies_at(args):
            self.down = True
        return result

    def _dies_at(self, args: tuple[Any, ...]) -> bool:
        marker = self.die_after
        writes = args[0] in ("SADD", "EVALSHA")
        return marker is not None and writes and any(marker in _bytes(a) for a in args)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _FlakyPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.flaky = self
        return pipe


class _FlakyPipeline(Pipeline):
    flaky: FlakyRedis

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.flaky.down:
            await self.reset()
            raise RedisConnectionError("Redis is away (test)")
        sent = [args for args, _options in self.command_stack]
        answers = await super().execute(raise_on_error)
        if any(self.flaky._dies_at(args) for args in sent):
            self.flaky.down = True
            raise RedisConnectionError("the worker died with the answers in flight (test)")
        return answers


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture
async def flaky(redis_url: str) -> AsyncIterator[FlakyRedis]:
    client = FlakyRedis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()
    try:
        yield client
    finally:
        client.down = False
        await client.aclose()


async def _until_done(worker: FleetWorker, clock: FakeClock, runs: int = 10) -> dict[str, Any]:
    """Run the item as arq would: again after each hand-back's defer (virtual time)."""
    for _ in range(runs):
        try:
            return await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
        except RetryLaterError as exc:
            clock.advance(exc.defer)
    raise AssertionError(f"the item did not end in {runs} runs")


def _worker(client: Any, redis: Redis, **options: Any) -> FleetWorker:
    locks = BagLocks(redis, ttl=1.0, poll=0.02)
    return FleetWorker(client, RedisLedger(redis), locks, None, lock_wait=5.0, **options)


async def test_row11_redis_away_as_the_answer_arrives_then_the_job_runs_again_here(
    flaky: FlakyRedis,
) -> None:
    """The POST applies and is answered 200 while Redis is unreachable: the ledger
    cannot record it and the job fails (arq runs it again a second later, in the same
    worker). The rerun records the refund this worker got; it used to read the bag
    back, take its own refund for another item's ("known") and send again."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0)])

    async def away() -> None:
        flaky.down = True

    server.on_answer = away
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, flaky)
        await worker.ledger.register(KEY, ITEM)
        with pytest.raises(RedisError):
            await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
        server.on_answer = None
        flaky.down = False  # back: the job runs again
        result = await _until_done(worker, clock)
    assert (result["state"], result["refund_id"]) == ("applied", server.ours[0])
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_row12_a_worker_dies_between_the_ledger_writes_of_applied(
    flaky: FlakyRedis, redis_url: str
) -> None:
    """A worker gets the 200 and dies right after its first ledger write of "applied"
    (the bag's refund set). Another worker (another process: a client that knows
    nothing) runs the item: the refund and the item's state are one write, so it finds
    the item applied. It used to find it sent, with its refund on the bag as another
    item's, prove it absent and send again."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0)])
    healthy = Redis.from_url(redis_url)
    try:
        async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
            dying = _worker(client, flaky)
            await dying.ledger.register(KEY, ITEM)
            flaky.die_after = b":refunds"
            with pytest.raises(RedisError):
                await dying.run(KEY, ITEM, dying.ledger.sign(KEY, ITEM))
        async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as other:
            result = await _until_done(_worker(other, healthy), clock)
    finally:
        await healthy.aclose()
    assert (result["state"], result["refund_id"]) == ("applied", server.ours[0])
    assert server.posts == 1
    assert len(server.ours) == 1


@pytest.mark.parametrize("who", ["a worker started after the loss", "the same worker"])
async def test_row13_redis_restarts_empty_with_a_post_in_flight(
    flaky: FlakyRedis, who: str
) -> None:
    """A worker's POST is in flight (it commits 20 s later) when Redis restarts empty
    and the worker dies; the file is enqueued again. The ledger's epoch is gone: the
    item's rerun waits a full settle window before any send, and then reads the bag,
    which shows the first POST's refund: not sent (already_present). It used to send
    at once: two refunds."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, body=GATEWAY_504, commit_after=20.0, hang=True)])
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        first = _worker(client, flaky)
        await first.ledger.register(KEY, ITEM)
        running = asyncio.ensure_future(first.run(KEY, ITEM, first.ledger.sign(KEY, ITEM)))
        await server.post_arrived.wait()
        await flaky.flushall()  # Redis restarted with nothing
        running.cancel()  # ... and the worker went with it
        await asyncio.gather(running, return_exceptions=True)
        await first.ledger.register(KEY, ITEM)  # the file, enqueued again
        async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as fresh:
            worker = first if who == "the same worker" else _worker(fresh, flaky)
            with pytest.raises(RetryLaterError) as held:
                await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
            assert server.posts == 1
            assert held.value.defer >= ROOMY.settle_running
            clock.advance(held.value.defer)  # arq runs it again after the defer
            result = await _until_done(worker, clock)
    assert (result["state"], result["outcome"]) == ("failed", "already_present")
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_row13_a_redis_without_persistence_is_refused(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker does not start on a Redis that does not fsync every write, unless the
    operator passes the flag that names the risk."""
    import argparse

    from violet_async.fleet import _cli as fleet_cli
    from violet_async.fleet._arq import FleetConfig, startup

    for name, value in (
        ("VIOLET_APP_ID", "11"),
        ("VIOLET_APP_SECRET", "s"),
        ("VIOLET_TOKEN", "t"),
        ("VIOLET_BASE_URL", "http://127.0.0.1:9/v1"),
    ):
        monkeypatch.setenv(name, value)
    redis = Redis.from_url(redis_url)
    await redis.config_set("appendfsync", "everysec")
    try:
        config = FleetConfig(redis_url=redis_url)
        with pytest.raises(NonDurableRedisError, match="appendfsync"):
            await startup({"redis": redis, "violet_config": config})
        risky = FleetConfig(redis_url=redis_url, accept_double_refunds_if_redis_loses_data=True)
        ctx: dict[str, Any] = {"redis": redis, "violet_config": risky}
        await startup(ctx)
        await ctx["violet_client"].aclose()
        args = argparse.Namespace(
            redis=redis_url,
            prefix="{violet}",
            rate=None,
            settle=1.0,
            timeout=1.0,
            lock_ttl=3.0,
            concurrency=1,
            job_timeout=5.0,
            base_url=None,
            burst=True,
            accept_double_refunds_if_redis_loses_data=False,
        )
        assert await fleet_cli._worker(args) == 2  # the console script's refusal
        assert "appendfsync" in capsys.readouterr().err
        monkeypatch.setenv("VIOLET_FLEET_ACCEPT_DOUBLE_REFUNDS_IF_REDIS_LOSES_DATA", "1")
        assert FleetConfig.from_env().accept_double_refunds_if_redis_loses_data
    finally:
        await redis.config_set("appendfsync", "always")
        await redis.aclose()


async def test_row13_the_answer_arrives_after_redis_lost_the_ledger(flaky: FlakyRedis) -> None:
    """Redis restarts empty while a worker's POST is in flight; the POST's 504 arrives
    before the file is enqueued again, so the worker's "pending" write finds no record.
    The worker holds the fleet's sends, and the rerun (re-registered from the job's own
    copy of the item) finds the refund by its baseline read after the hold: one refund,
    reported already_present, never a second POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, body=GATEWAY_504, commit_after=20.0)])

    async def lost() -> None:
        await flaky.flushall()

    server.on_answer = lost
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        worker = _worker(client, flaky)
        await worker.ledger.register(KEY, ITEM)
        with pytest.raises(RetryLaterError) as held:
            await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
        assert held.value.defer >= ROOMY.settle_running
        server.on_answer = None
        result = await _until_done(worker, clock)
    assert (result["state"], result["outcome"]) == ("failed", "already_present")
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_row11_the_job_delivered_again_to_two_workers_at_once(
    flaky: FlakyRedis, redis_url: str
) -> None:
    """Row 11, and then the job is delivered twice at once: again to this worker and
    to another. One POST, and both runs report the one refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0)])

    async def away() -> None:
        flaky.down = True

    server.on_answer = away
    healthy = Redis.from_url(redis_url)
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        w1 = _worker(client, flaky)
        await w1.ledger.register(KEY, ITEM)
        with pytest.raises(RedisError):
            await w1.run(KEY, ITEM, w1.ledger.sign(KEY, ITEM))
        server.on_answer = None
        flaky.down = False
        async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as other:
            w2 = _worker(other, healthy)
            both = await asyncio.gather(
                _until_done(w2, clock), _until_done(w1, clock), return_exceptions=True
            )
    await healthy.aclose()
    assert server.posts == 1
    assert len(server.ours) == 1
    assert all(isinstance(r, dict) and r["refund_id"] == server.ours[0] for r in both)


async def test_row12_a_refund_half_recorded_by_an_older_worker(
    flaky: FlakyRedis, redis_url: str
) -> None:
    """A ledger written before owners were kept: the bag's refund set holds the item's
    refund, its state still says sent (an older worker died between its two writes).
    With no owner recorded, the record's baseline tells whether the refund is older
    than the send; here it is not, so another worker claims it: one POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0)])

    async def away() -> None:
        flaky.down = True

    server.on_answer = away
    healthy = Redis.from_url(redis_url)
    try:
        async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
            dying = _worker(client, flaky)
            await dying.ledger.register(KEY, ITEM)
            with pytest.raises(RedisError):
                await dying.run(KEY, ITEM, dying.ledger.sign(KEY, ITEM))
        ledger = RedisLedger(healthy)
        await healthy.sadd(ledger.bag_refunds_key(BAG_ID), server.ours[0])  # the old first write
        async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as other:
            result = await _until_done(_worker(other, healthy), clock)
    finally:
        await healthy.aclose()
    assert (result["state"], result["refund_id"]) == ("applied", server.ours[0])
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_enqueue_new_ledger_starts_without_the_hold(redis_url: str, tmp_path: Any) -> None:
    """`enqueue --new-ledger` on an empty Redis: the epoch says no hold. Without it, the
    first worker makes an epoch that holds sends for its settle window; a later
    `--new-ledger` leaves that one alone."""
    import argparse
    import io

    from violet_async.fleet import _cli as fleet_cli

    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        rows = tmp_path / "rows.csv"
        rows.write_text("order_id,bag_id,amount_refunded\n100001,200001,500\n")
        args = argparse.Namespace(
            redis=redis_url, prefix="{violet}", file=rows, kind="refund", new_ledger=True
        )
        assert await fleet_cli._enqueue(args, io.StringIO(), io.StringIO()) == 0
        ledger = RedisLedger(redis)
        assert (await ledger.epoch(hold=60.0)).hold_until == 0.0
        await redis.flushall()
        held = await ledger.epoch(hold=60.0, now=1000.0)
        assert held.hold_until == 1060.0
        assert not await ledger.new_fleet()
        assert (await ledger.epoch(hold=1.0)).hold_until == 1060.0
        assert await ledger.hold_sends(1200.0) == 1200.0
        assert await ledger.hold_sends(1100.0) == 1200.0  # never shortened
    finally:
        await redis.flushall()
        await redis.aclose()
