"""Pace per merchant across a fleet: lanes in Redis, a 429 hands the item back (nothing
applied) and slows only its merchant."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy
from violet_async._pace import DECREASE, RECOVER
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetPace,
    FleetWorker,
    RedisLedger,
    RetryLaterError,
    item_key,
)
from violet_async.testing import FakeViolet, Fault

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here

STRICT, OTHER = 20001, 20002


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_lane_starts_at_a_429_and_spaces_the_fleets_sends(redis: Redis) -> None:
    """No lane before a 429; after it, slots are Retry-After away and spaced by the
    rate; a slot beyond patience is not taken; a burst of 429s slows it once."""
    pace = FleetPace(redis, 11)
    assert await pace.reserve(STRICT, 1.0) is None
    assert not await pace.learning()
    rate = await pace.limited(STRICT, 0.25)
    assert rate == pytest.approx(1.0)  # none got through lately: one a second
    assert await pace.learning()
    first = await pace.reserve(STRICT, 2.0)
    assert first is not None
    assert 0.2 < first <= 0.25
    second = await pace.reserve(STRICT, 2.0)
    assert second is not None
    assert second - first == pytest.approx(1.0, abs=0.05)
    far = await pace.reserve(STRICT, 0.1)
    assert far is not None
    assert far < -1.0  # nothing taken: come back then
    assert await pace.reserve(OTHER, 1.0) is None  # another merchant is not paced
    await redis.hset(f"{{violet}}:pace:11:{STRICT}", "slowed_at", 0)
    slowed = await pace.limited(STRICT, 0.0)
    assert slowed == pytest.approx(1.0 * DECREASE)
    assert await pace.limited(STRICT, 0.0) == pytest.approx(slowed)  # once per burst
    await pace.succeeded(STRICT)  # climbs back toward the rate its 429 came at
    assert await pace.rate(STRICT) == pytest.approx(slowed + (1.0 - slowed) * RECOVER)


async def test_a_429_hands_the_item_back_and_slows_only_its_merchant(redis: Redis) -> None:
    """A strict merchant's 429: the item goes back to new (nothing applied) with a
    defer, its merchant is learned from the order, and its next run waits for the
    lane; another merchant's item runs at once; each bag is refunded once."""
    async with FakeViolet(orders=2, seed=1, merchants=2) as fake:
        (o1, b1), (o2, b2) = fake.seeded
        assert fake.bag(o1, b1).merchant_id == STRICT
        fake.script("refund", Fault.RATE_LIMIT, bag_id=b1)
        client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2))
        async with client:
            worker = FleetWorker(
                client, RedisLedger(redis), BagLocks(redis), patience=0.0, merchant_pace=True
            )
            strict = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
            other = BatchItem.refund(2, o2, b2, RefundBagRequest(amount_refunded=100))
            with pytest.raises(RetryLaterError) as raised:
                await worker.run(
                    item_key(strict), strict, worker.ledger.sign(item_key(strict), strict)
                )
            assert raised.value.defer > 0
            record = await worker.ledger.get(item_key(strict))
            assert record is not None
            assert record.state == "new"
            assert fake.ledger.refunds_per_bag.get(b1, 0) == 0
            assert worker.pace is not None
            assert await worker.pace.merchant_of(o1) == STRICT
            assert await worker.pace.rate(STRICT) is not None
            # The other merchant has no lane: its item goes now.
            done = await worker.run(
                item_key(other), other, worker.ledger.sign(item_key(other), other)
            )
            assert done["state"] == "applied"
            assert await worker.pace.rate(OTHER) is None
            # The strict one waits for its lane's slot (handed back, not slept on).
            with pytest.raises(RetryLaterError, match="pace"):
                await worker.run(
                    item_key(strict), strict, worker.ledger.sign(item_key(strict), strict)
                )
            lane = f"{{violet}}:pace:{fake.app_id}:{STRICT}"
            await redis.hset(lane, mapping={"tat": 0, "sent_tat": 0})  # its turn
            again = await worker.run(
                item_key(strict), strict, worker.ledger.sign(item_key(strict), strict)
            )
            assert again["state"] == "applied"
            # It went through the send-time gate: the lane's next send slot moved on.
            assert float(await redis.hget(lane, "sent_tat") or 0) > 0
    assert fake.ledger.double_refunds() == {}
    assert fake.ledger.refunds_per_bag[b1] == 1


async def test_the_send_gate_spaces_requests_as_they_leave(redis: Redis) -> None:
    """The gate takes the lane's next slot for a request about to leave (with no limit
    given, however far), on its own schedule: two items a reserved slot apart
    that reach the send at different speeds still leave 1 / rate apart, and a 429's
    Retry-After holds the gate as it holds the reservations."""
    pace = FleetPace(redis, 12)
    assert await pace.gate(STRICT) is None  # no lane: sends are not held
    await pace.limited(STRICT, 0.3)  # a lane at one a second, held 0.3 s
    first = await pace.gate(STRICT)
    assert first is not None
    assert 0.25 < first <= 0.3
    second = await pace.gate(STRICT)
    assert second is not None
    assert second - first == pytest.approx(1.0, abs=0.05)
    # The reservations are a schedule of their own: gating took none of them.
    reserved = await pace.reserve(STRICT, 2.0)
    assert reserved is not None
    assert 0.25 < reserved <= 0.3
    # A slowdown restarts the gate at the new spacing, and its Retry-After holds it.
    await redis.hset(f"{{violet}}:pace:12:{STRICT}", "slowed_at", 0)
    slowed = await pace.limited(STRICT, 2.0)
    assert slowed == pytest.approx(DECREASE)
    held = await pace.gate(STRICT)
    assert held is not None
    assert held > 1.9


async def test_a_run_cancelled_at_the_send_gate_has_sent_nothing(redis: Redis) -> None:
    """The gate waits before the send is recorded or made: a run cancelled there (its
    lock lost, the worker stopping) leaves the item new, nothing sent, and the next
    run refunds the bag once."""
    async with FakeViolet(orders=1, seed=1, merchants=1) as fake:
        ((order_id, bag_id),) = fake.seeded
        merchant = fake.bag(order_id, bag_id).merchant_id
        assert merchant is not None
        client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2))
        async with client:
            # Patient enough, and a deadline (60 s, the default) long enough, to wait
            # for the gate's slot half a minute on.
            worker = FleetWorker(
                client, RedisLedger(redis), BagLocks(redis), patience=40.0, merchant_pace=True
            )
            item = BatchItem.refund(1, order_id, bag_id, RefundBagRequest(amount_refunded=100))
            key = item_key(item)
            assert worker.pace is not None
            await worker.pace.learn(order_id, merchant)  # as a refund of the order taught it
            lane = f"{{violet}}:pace:{fake.app_id}:{merchant}"
            seconds, micros = await redis.time()
            far = seconds * 1000 + micros / 1000 + 30_000  # the gate's next slot
            await redis.hset(lane, mapping={"rate": 1, "tat": 0, "sent_tat": far})
            await redis.set(f"{{violet}}:pace:{fake.app_id}:learning", "1")  # as a 429 sets
            run = asyncio.ensure_future(worker.run(key, item, worker.ledger.sign(key, item)))
            for _ in range(500):  # until the run has taken its gate slot (and waits on it)
                if float(await redis.hget(lane, "sent_tat") or 0) > far:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the run never reached the send gate: {run}")
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            record = await worker.ledger.get(key)
            assert record is not None
            assert record.state == "new"
            assert fake.ledger.refunds_per_bag.get(bag_id, 0) == 0
            await redis.hset(lane, "sent_tat", 0)
            done = await worker.run(key, item, worker.ledger.sign(key, item))
            assert done["state"] == "applied"
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert fake.ledger.double_refunds() == {}


async def _lane_at(redis: Redis, fake: FakeViolet, merchant: int, **fields: object) -> str:
    """The merchant's lane in Redis with ``fields`` (as a 429 made it: the fleet is
    learning merchants); returns the lane's key."""
    lane = f"{{violet}}:pace:{fake.app_id}:{merchant}"
    await redis.hset(lane, mapping={k: str(v) for k, v in fields.items()})
    await redis.set(f"{{violet}}:pace:{fake.app_id}:learning", "1")
    return lane


async def _redis_ms(redis: Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) * 1000 + float(micros) / 1000


@pytest.mark.parametrize(
    ("patience", "deadline", "ahead"),
    [
        # The call's deadline bounds it (seed 1066: a 429's Retry-After of 19.09 s moved
        # the gate 18.75 s on, past a 15 s deadline): patience alone would wait.
        (60.0, 15.0, 18.75),
        # The worker's patience bounds it (no deadline at all).
        (1.0, None, 5.0),
    ],
)
async def test_a_send_gate_further_than_the_run_may_wait_takes_no_slot_and_sends_nothing(
    redis: Redis, patience: float, deadline: float | None, ahead: float
) -> None:
    """The lane's next send slot is further than the run may wait for it (its deadline
    less a connect timeout, or its patience): the gate takes no slot (the lane's send
    schedule is untouched), nothing is sent or recorded as sent, and the item is handed
    back new (not failed) until its slot is within reach; then it is refunded once."""
    async with FakeViolet(orders=1, seed=1, merchants=1) as fake:
        ((order_id, bag_id),) = fake.seeded
        merchant = fake.bag(order_id, bag_id).merchant_id
        assert merchant is not None
        policy = RetryPolicy(settle_running=0.5, settle_lag=0.2, deadline=deadline)
        async with fake.client(retry=policy) as client:
            worker = FleetWorker(
                client, RedisLedger(redis), BagLocks(redis), patience=patience, merchant_pace=True
            )
            item = BatchItem.refund(
                1, order_id, bag_id, RefundBagRequest(amount_refunded=100), merchant_id=merchant
            )
            key = item_key(item)
            await worker.ledger.register(key, item)
            gate_at = str(await _redis_ms(redis) + ahead * 1000)
            # Its reservation is free (the item starts at once); its send slot is not.
            lane = await _lane_at(redis, fake, merchant, rate=1, tat=0, sent_tat=gate_at, epoch=3)
            with pytest.raises(RetryLaterError, match=r"pace.*nothing was sent") as raised:
                await worker.run(key)
            # It got as far as the send (its baseline read), and no further.
            assert fake.ledger.requests["list_refunds"] == 1
            assert fake.ledger.requests["refund"] == 0
            # No slot was taken: the lane's send schedule is as it was.
            assert (await redis.hget(lane, "sent_tat") or b"").decode() == gate_at
            record = await worker.ledger.get(key)
            assert record is not None
            assert (record.state, record.outcome, record.error) == ("new", None, None)
            assert not record.needs_review
            assert await worker.ledger.open_on_bag(bag_id) == set()  # nothing in flight
            # Back before the slot, once it is within what a run may wait for.
            reach = min(patience, (deadline or math.inf) - worker.engine.timeouts.connect)
            assert 0 < ahead - raised.value.defer <= reach
            # Its turn: the slot is now. Sent once, through the gate.
            now = await _redis_ms(redis)
            await redis.hset(lane, mapping={"tat": "0", "sent_tat": str(now)})
            done = await worker.run(key)
            assert done["state"] == "applied"
            assert float(await redis.hget(lane, "sent_tat") or 0) >= now + 999  # its slot
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert fake.ledger.double_refunds() == {}


async def test_a_resend_held_at_the_gate_leaves_the_first_send_on_record(redis: Redis) -> None:
    """A run's first send gets a 500 (it may have applied; this server applied nothing),
    the bag read back shows nothing, and the re-send's slot is past the worker's
    patience (the lane allows one send a minute). The re-send takes no slot and is not
    made; the ledger keeps the first send on record (sent, in flight on its bag), so
    the next run reads the bag back before anything more: one refund, never two."""
    from violet_async import Timeouts
    from violet_async.testing import FakeClock

    from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client

    clock = FakeClock()
    server = Hostile(clock, script=[Step(500, body=VIOLET_500, commit_after=None)])
    item = BatchItem.refund(
        1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300), merchant_id=STRICT
    )
    key = item_key(item)
    # A settle window within the worker's patience: the run waits it out and reads.
    policy = RetryPolicy(
        initial_delay=0.5, max_delay=4.0, deadline=300.0, settle_running=0.3, settle_lag=0.2
    )
    async with hostile_client(
        server, retry=policy, timeouts=Timeouts(connect=1.0, read=2.0)
    ) as client:
        worker = FleetWorker(
            client,
            RedisLedger(redis),
            BagLocks(redis, ttl=1.0, poll=0.02),
            patience=1.0,
            merchant_pace=True,
        )
        await worker.ledger.register(key, item)
        lane = f"{{violet}}:pace:{worker.engine.app_id}:{STRICT}"
        await redis.hset(lane, mapping={"rate": str(1 / 60), "tat": "0", "sent_tat": "0"})
        await redis.set(f"{{violet}}:pace:{worker.engine.app_id}:learning", "1")
        with pytest.raises(RetryLaterError, match=r"pace.*nothing was sent") as raised:
            await worker.run(key)
        assert server.posts == 1  # the first send only
        assert server.reads >= 2  # its baseline, and the read that found nothing
        # The first send's slot only: a minute on from it.
        assert float(await redis.hget(lane, "sent_tat") or 0) > await _redis_ms(redis) + 50_000
        record = await worker.ledger.get(key)
        assert record is not None
        assert record.state == "sent"  # the first send stays on record
        sent = record.pending()
        assert sent is not None
        assert sent.sends == 1
        assert await worker.ledger.open_on_bag(BAG_ID) == {key}
        # The minute passes (on Redis's clock, as the lane's schedule is kept): the next
        # run resumes it through its merchant's turn and the gate, the bag read back
        # first, then sent again only because nothing is there.
        await redis.hset(lane, mapping={"tat": "0", "sent_tat": "0"})
        result = None
        clock.advance(raised.value.defer)
        for _ in range(10):
            try:
                result = await worker.run(key)
                break
            except RetryLaterError as exc:
                clock.advance(exc.defer)
        assert result is not None
        assert result["state"] == "applied"
    assert server.posts == 2
    assert len(server.refunds) == 1


async def test_a_merchant_column_rides_with_the_item_signed(redis_url: str) -> None:
    """An input's ``merchant_id`` goes enqueue -> job -> ledger -> worker with a
    signature of its own. The item's signature is what it always was (a worker from
    before the column runs the item as before), and the merchant is not part of the
    item's key, so it never makes another item of the same refund."""
    import hashlib
    import hmac

    import orjson

    from violet_async._converter import encode_request
    from violet_async.fleet import create_fleet_pool, enqueue, job_deserializer, job_id
    from violet_async.fleet._arq import _item_from

    pool = await create_fleet_pool(redis_url)
    try:
        await pool.flushall()
        with_merchant = BatchItem.refund(
            1, 301, 401, RefundBagRequest(amount_refunded=100), merchant_id=STRICT
        )
        without = BatchItem.refund(2, 302, 402, RefundBagRequest(amount_refunded=100))
        assert item_key(with_merchant) == item_key(without_merchant(with_merchant))
        report = await enqueue(pool, [with_merchant, without])
        assert report.queued == 2
        ledger = RedisLedger(pool)
        for item in (with_merchant, without):
            key = item_key(item)
            record = await ledger.get(key)
            assert record is not None
            assert record.item == item
            assert ledger.verify(key, record.item, record.signature)
            # The item's own signature does not cover the merchant: as before it.
            old = orjson.dumps(
                [key, "refund", item.order_id, item.bag_id, encode_request(item.request).decode()]
            )
            expected = hmac.new(FLEET_KEY_BYTES, old, hashlib.sha256).hexdigest()
            assert record.signature == expected
            raw = await pool.get(f"arq:job:{job_id(key)}")
            assert raw is not None
            data = job_deserializer(raw)["a"][1]
            assert data.get("merchant_id") == item.merchant_id
            from_job = _item_from(data)
            assert from_job == item
            assert ledger.verify(key, from_job, data["sig"])
            if item.merchant_id is not None:
                sig = data["merchant_sig"]
                assert ledger.merchant_of(key, item.merchant_id, sig) == STRICT
                # Another merchant, another item's key, junk, no signature: unknown.
                assert ledger.merchant_of(key, OTHER, sig) is None
                assert ledger.merchant_of(item_key(without), STRICT, sig) is None
                assert ledger.merchant_of(key, "x", sig) is None
                assert ledger.merchant_of(key, STRICT, "") is None
                assert ledger.merchant_of(key, STRICT, None) is None
    finally:
        await pool.flushall()
        await pool.aclose()


FLEET_KEY_BYTES = _fleet_redis.FLEET_KEY.encode()


def without_merchant(item: BatchItem) -> BatchItem:
    return BatchItem(item.line, item.kind, item.order_id, item.bag_id, item.request)


@pytest.mark.parametrize("stored", [str(OTHER), "", "x", "-5"])
async def test_a_merchant_changed_in_the_ledger_is_ignored_never_a_money_decision(
    redis: Redis, stored: str
) -> None:
    """Someone without the fleet key moves a signed item to another merchant (or
    blanks it, or writes junk): its signature no longer holds, so the worker paces it
    as an item of unknown merchant (looked up from its order) and refunds the bag
    once; what is sent, and whether, is the item's own signature's business."""
    async with FakeViolet(orders=1, seed=1, merchants=1) as fake:
        ((order_id, bag_id),) = fake.seeded
        real = fake.bag(order_id, bag_id).merchant_id
        client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2))
        async with client:
            ledger = RedisLedger(redis)
            worker = FleetWorker(client, ledger, BagLocks(redis), merchant_pace=True)
            assert worker.pace is not None
            await worker.pace.limited(STRICT + 99, 0.0)  # a 429 seen: merchants are looked up
            item = BatchItem.refund(
                1, order_id, bag_id, RefundBagRequest(amount_refunded=100), merchant_id=real
            )
            key = item_key(item)
            await ledger.register(key, item)
            await redis.hset(ledger.record_key(key), "merchant_id", stored)
            record = await ledger.get(key)
            assert record is not None
            assert record.item.merchant_id is None
            summary = await worker.run(key)
            assert summary["state"] == "applied"
            assert fake.ledger.requests["get_order"] == 1  # unknown: read from its order
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert fake.ledger.double_refunds() == {}


async def test_a_known_merchant_is_paced_from_its_first_row_without_a_look_up(
    redis: Redis,
) -> None:
    """Once its merchant has a lane, an item that names its merchant takes the lane's
    slot on its first run, with no GET /orders; one that does not is looked up."""
    async with FakeViolet(orders=2, seed=1, merchants=1) as fake:
        (o1, b1), (o2, b2) = fake.seeded
        merchant = fake.bag(o1, b1).merchant_id
        assert merchant is not None
        assert fake.bag(o2, b2).merchant_id == merchant
        client = fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2))
        async with client:
            worker = FleetWorker(
                client, RedisLedger(redis), BagLocks(redis), patience=2.0, merchant_pace=True
            )
            assert worker.pace is not None
            await worker.pace.limited(merchant, 0.0)  # a lane, as another item's 429 made
            lane = f"{{violet}}:pace:{fake.app_id}:{merchant}"
            await redis.hset(lane, mapping={"rate": 50, "tat": 0, "sent_tat": 0})
            named = BatchItem.refund(
                1, o1, b1, RefundBagRequest(amount_refunded=100), merchant_id=merchant
            )
            key = item_key(named)
            await worker.ledger.register(key, named)
            done = await worker.run(key)
            assert done["state"] == "applied"
            assert fake.ledger.requests["get_order"] == 0
            assert float(await redis.hget(lane, "tat") or 0) > 0  # its slot was taken
            unnamed = BatchItem.refund(2, o2, b2, RefundBagRequest(amount_refunded=100))
            key = item_key(unnamed)
            await worker.ledger.register(key, unnamed)
            assert (await worker.run(key))["state"] == "applied"
            assert fake.ledger.requests["get_order"] == 1  # learned from its order
    assert fake.ledger.double_refunds() == {}


async def test_only_a_send_of_the_lanes_present_epoch_slows_it(redis: Redis) -> None:
    """A wave of 429s from sends gated before the lane slowed (or never gated) slows it
    once: each slowdown starts a new epoch, and only a send gated in the present one is
    news (the batch's lanes count them so too)."""
    pace = FleetPace(redis, 13)
    rate = await pace.limited(STRICT, 0.0)  # the lane starts
    slot = await pace.gate_slot(STRICT)
    assert slot is not None
    assert slot[1] == 0
    second = await pace.gate_slot(STRICT)
    assert second is not None
    assert second[1] == 0  # both left in epoch 0
    assert await pace.limited(STRICT, 0.0, epoch=-1) == pytest.approx(rate)  # not gated
    slowed = await pace.limited(STRICT, 0.0, epoch=slot[1])
    assert slowed == pytest.approx(rate * DECREASE)
    # The other send of epoch 0 got its 429 too: the same wave, no second slowdown, at
    # once or a second later.
    assert await pace.limited(STRICT, 0.0, epoch=second[1]) == pytest.approx(slowed)
    await redis.hset(f"{{violet}}:pace:13:{STRICT}", "slowed_at", 0)
    assert await pace.limited(STRICT, 0.0, epoch=second[1]) == pytest.approx(slowed)
    third = await pace.gate_slot(STRICT)
    assert third is not None
    assert third[1] == 1
    assert await pace.limited(STRICT, 0.0, epoch=third[1]) == pytest.approx(slowed * DECREASE)
    assert await pace.gate_slot(OTHER) is None  # no lane: no epoch


@pytest.mark.parametrize(
    ("value", "paced"),
    [(None, True), ("1", True), ("", True), ("0", False), ("off", False), ("false", False)],
)
async def test_merchant_pace_is_the_fleets_default_and_the_env_turns_it_off(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, value: str | None, paced: bool
) -> None:
    """Per-merchant pace is on unless ``VIOLET_FLEET_MERCHANT_PACE`` says 0 (or off,
    false, no); ``merchant_pace=`` overrides the environment either way."""
    if value is None:
        monkeypatch.delenv("VIOLET_FLEET_MERCHANT_PACE", raising=False)
    else:
        monkeypatch.setenv("VIOLET_FLEET_MERCHANT_PACE", value)
    async with FakeViolet(orders=1, seed=1) as fake:
        async with fake.client() as client:
            ledger, locks = RedisLedger(redis), BagLocks(redis)
            assert (FleetWorker(client, ledger, locks).pace is not None) is paced
            overridden = FleetWorker(client, ledger, locks, merchant_pace=not paced)
            assert (overridden.pace is not None) is (not paced)


async def test_the_happy_path_notes_the_merchant_and_makes_no_lane(redis: Redis) -> None:
    """No 429 anywhere: an item goes unpaced (no look-up, no lane), and its refund
    notes its order's merchant for the fleet, in the success's own round trip."""
    async with FakeViolet(orders=1, seed=1, merchants=1) as fake:
        ((order_id, bag_id),) = fake.seeded
        merchant = fake.bag(order_id, bag_id).merchant_id
        async with fake.client() as client:
            worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis), merchant_pace=True)
            item = BatchItem.refund(1, order_id, bag_id, RefundBagRequest(amount_refunded=100))
            key = item_key(item)
            await worker.ledger.register(key, item)
            assert (await worker.run(key))["state"] == "applied"
            assert worker.pace is not None
            assert await worker.pace.merchant_of(order_id) == merchant
            assert await worker.pace.rate(merchant or 0) is None
            assert fake.ledger.requests["get_order"] == 0
    assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.parametrize("forged", [False, True])
async def test_a_jobs_merchant_counts_only_with_its_signature(redis: Redis, forged: bool) -> None:
    """A job whose item the ledger lost is registered again from the job's copy: its
    merchant with it when the merchant's signature holds, none when someone changed
    it (the refund runs either way, once)."""
    from violet_async.fleet._arq import _item_dict, refund_job

    async with FakeViolet(orders=1, seed=1, merchants=1) as fake:
        ((order_id, bag_id),) = fake.seeded
        real = fake.bag(order_id, bag_id).merchant_id
        assert real is not None
        async with fake.client() as client:
            ledger = RedisLedger(redis)
            worker = FleetWorker(client, ledger, BagLocks(redis), merchant_pace=True)
            item = BatchItem.refund(
                1, order_id, bag_id, RefundBagRequest(amount_refunded=100), merchant_id=real
            )
            key = item_key(item)
            data = _item_dict(item, ledger.sign(key, item), ledger.sign_merchant(key, real))
            if forged:
                data["merchant_id"] = OTHER
            done = await refund_job({"violet_fleet": worker}, key, data)
            assert done["state"] == "applied"
            record = await ledger.get(key)
            assert record is not None
            assert record.item.merchant_id == (None if forged else real)
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_a_lying_429_that_applied_is_never_refunded_again(redis: Redis) -> None:
    """A hostile platform commits the refund and answers 429 anyway (Violet says a 429
    applied nothing; this one lies). With per-merchant pace, the default, the item is
    handed back as new; its next run reads the bag before any send, finds this exact
    refund and holds: one POST, one refund, never two."""
    from violet_async import Timeouts
    from violet_async.testing import FakeClock

    from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

    clock = FakeClock()
    too_many = b'{"status": 429, "message": "Too Many Requests", "error_code": 4290}'
    server = Hostile(clock, script=[Step(429, body=too_many, commit_after=0.0)])
    item = BatchItem.refund(
        1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300), merchant_id=STRICT
    )
    key = item_key(item)
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
    async with hostile_client(
        server, retry=policy, timeouts=Timeouts(connect=1.0, read=2.0)
    ) as client:
        worker = FleetWorker(
            client, RedisLedger(redis), BagLocks(redis, ttl=1.0, poll=0.02), lock_wait=5.0
        )
        assert worker.pace is not None  # the default
        await worker.ledger.register(key, item)
        result = None
        for _ in range(10):
            try:
                result = await worker.run(key)
                break
            except RetryLaterError as exc:
                clock.advance(exc.defer)
        assert result is not None
    assert server.posts == 1
    assert len(server.refunds) == 1
    # Held for a person (the bag holds this very refund): never sent twice.
    assert (result["state"], result["outcome"]) == ("failed", "already_present")


async def test_a_worker_dying_as_it_learns_the_merchant_after_a_429_leaves_the_item_new(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 proves nothing applied: the item is new again before the worker looks
    its merchant up. A worker that dies in that look-up (here: it raises) must not
    leave the ledger's ``sent`` record, which the next worker would read back, taking
    a refund another system made in the wait for the item's own (simulator
    ``refund_in_429``, worker seed 161)."""
    async with FakeViolet(orders=1, seed=1, merchants=2) as fake:
        ((o1, b1),) = fake.seeded
        fake.script("refund", Fault.RATE_LIMIT, bag_id=b1)
        async with fake.client(retry=RetryPolicy(settle_running=0.5, settle_lag=0.2)) as client:
            worker = FleetWorker(
                client, RedisLedger(redis), BagLocks(redis), patience=0.0, merchant_pace=True
            )

            async def dies(*args: object, **kwargs: object) -> int:
                raise ConnectionResetError("the worker's process is gone")

            monkeypatch.setattr(worker, "_merchant_of", dies)
            item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
            with pytest.raises(ConnectionResetError):
                await worker.run(item_key(item), item, worker.ledger.sign(item_key(item), item))
            record = await worker.ledger.get(item_key(item))
    assert record is not None
    assert record.state == "new"
    assert fake.ledger.refunds_per_bag.get(b1, 0) == 0
