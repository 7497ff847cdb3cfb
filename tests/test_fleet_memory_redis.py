"""The simulator's in-memory Redis against a real redis-server: one table of ledger and
bag-lock scenarios, run through the real RedisLedger and BagLocks on each, and one of
merchant pacing and fleet rate-limit scenarios, run through the real FleetPace and
FleetRateLimit, must give identical results (every reply, every error, every key left
behind). The simulator's fleet runs on the in-memory one; this is what keeps its copy of
the Lua scripts from drifting away from the scripts silently.

The pacing scripts read Redis's ``TIME``: on the real server each runs with its text
unchanged after one line that answers ``redis.call('TIME')`` from the test's clock
(every other command goes to Redis), the clock the in-memory server reads too."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import CancelBagRequest, RefundBagRequest
from violet_async._ask import PendingRefund, Phase, sent_once
from violet_async._pace import DECREASE
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetPace,
    FleetRateLimit,
    LockBusyError,
    RedisLedger,
    item_key,
)
from violet_async.fleet._pace import KEEP
from violet_async.testing.sim._redis import _SCRIPTS, MemoryRedis, MemoryRedisServer

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key

PREFIX = "{parity}"

Step = Callable[[RedisLedger, BagLocks, Any], Awaitable[Any]]


def _items() -> list[tuple[str, BatchItem]]:
    a = BatchItem.refund(1, 100001, 200001, RefundBagRequest(amount_refunded=500))
    b = BatchItem.refund(2, 100001, 200001, RefundBagRequest(amount_refunded=250))
    c = BatchItem.cancel(3, 100002, 200002, CancelBagRequest(reason="Ordered twice"))
    return [(item_key(x), x) for x in (a, b, c)]


def _asks() -> list[PendingRefund]:
    (_, a), (_, b), (_, c) = _items()
    return [
        sent_once("refund", a.order_id, a.bag_id, a.request, 1_700_000_000.0),
        sent_once("refund", b.order_id, b.bag_id, b.request, 1_700_000_001.0),
        sent_once("cancel", c.order_id, c.bag_id, c.request, 1_700_000_002.0),
    ]


async def _scenario(
    redis: Any, lose: Callable[[], Awaitable[None]], asks: list[PendingRefund]
) -> list[Any]:
    """Every ledger and lock operation the fleet worker uses, in states that take each
    script down each of its branches; returns what each step answered."""
    ledger = RedisLedger(cast(Redis, redis), prefix=PREFIX)
    locks = BagLocks(cast(Redis, redis), prefix=PREFIX, ttl=30.0)
    (ka, a), (kb, b), (kc, c) = _items()
    out: list[Any] = []
    epochs: list[str] = []

    def epoch_name(epoch_id: str) -> str:
        if epoch_id not in epochs:
            epochs.append(epoch_id)
        return f"epoch{epochs.index(epoch_id)}"

    async def step(name: str, call: Awaitable[Any]) -> Any:
        try:
            value = await call
        except Exception as exc:  # noqa: BLE001 - the error is the result compared
            out.append((name, "raised", type(exc).__name__, str(exc), getattr(exc, "until", None)))
            return None
        out.append((name, [show(v) for v in value] if isinstance(value, list) else show(value)))
        return value

    def show(value: Any) -> Any:
        if hasattr(value, "hold_until"):
            return ("Epoch", epoch_name(value.id), value.hold_until)
        if hasattr(value, "refunds"):  # a bag view: its record and the bag's sets
            sets = (value.opened, value.items, value.owners, value.refunds)
            return ("BagView", show(value.record), *(sorted(v) for v in sets))
        if hasattr(value, "to_dict"):  # a record, all of it but the time it was written
            return (value.to_dict(), value.ask, value.signature, value.ask_signature)
        if isinstance(value, set):
            return sorted(value)
        return value

    lock_a = locks.key(a.bag_id)
    lock_c = locks.key(c.bag_id)
    await redis.set(lock_a, "token-a", nx=True, px=30_000)
    await redis.set(lock_c, "token-c", nx=True, px=30_000)
    ask_a, ask_b, ask_c = asks

    # register, get, the epoch
    await step("register a", ledger.register(ka, a, source="f.csv"))
    await step("register a again", ledger.register(ka, a))
    await step("register b", ledger.register(kb, b))
    await step("get a", ledger.get(ka))
    await step("get missing", ledger.get("refund:1:2:none:0"))
    await step("new_fleet", ledger.new_fleet(now=1_700_000_000.0))
    await step("new_fleet again", ledger.new_fleet(now=1_700_000_001.0))
    first = await step("epoch", ledger.epoch(hold=10.0, now=1_700_000_002.0))
    # mark_sent: lock, epoch, hold, terminal
    await step("sent, wrong token", ledger.mark_sent(ka, ask_a, lock_key=lock_a, token="x"))
    await step(
        "sent, other epoch",
        ledger.mark_sent(ka, ask_a, lock_key=lock_a, token="token-a", epoch="nope", now=1.0),
    )
    await step(
        "sent a",
        ledger.mark_sent(
            ka, ask_a, lock_key=lock_a, token="token-a", epoch=first.id, now=1_700_000_003.5
        ),
    )
    await step("open on bag", ledger.open_on_bag(a.bag_id))
    await step("hold 1/3 later", ledger.hold_sends(1_700_000_100.123456789))
    await step("hold earlier", ledger.hold_sends(1_700_000_050.0))
    await step(
        "sent b, held",
        ledger.mark_sent(
            kb, ask_b, lock_key=lock_a, token="token-a", epoch=first.id, now=1_700_000_060.0
        ),
    )
    await step("pending b, no lock", ledger.mark_pending(kb, ask_b))
    await step("pending b, wrong token", ledger.mark_pending(kb, ask_b, lock_key=lock_a, token="x"))
    await step("review b", ledger.mark_review(kb, "a person looks"))
    await step("get b", ledger.get(kb))
    await step("open on bag again", ledger.open_on_bag(a.bag_id))
    await step("new b, lock", ledger.mark_new(kb, b.bag_id, lock_key=lock_a, token="token-a"))
    await step("get b again", ledger.get(kb))
    # applied: owners, another item's refund, terminal
    await step(
        "applied a", ledger.mark_applied(ka, a.bag_id, 77, reconciled=False, outcome="applied")
    )
    await step(
        "applied b, a's refund",
        ledger.mark_applied(kb, b.bag_id, 77, reconciled=False, outcome="applied"),
    )
    await step(
        "failed a (terminal)",
        ledger.mark_failed(ka, "X", "late", outcome="failed", bag_id=a.bag_id),
    )
    await step(
        "sent a (terminal)",
        ledger.mark_sent(ka, ask_a, lock_key=lock_a, token="token-a"),
    )
    await step(
        "failed b",
        ledger.mark_failed(
            kb, "E", "refused", outcome="failed", bag_id=b.bag_id, lock_key=lock_a, token="token-a"
        ),
    )
    await step("bag refunds", ledger.bag_refunds(a.bag_id))
    await step("bag refunds, a's own", ledger.bag_refunds(a.bag_id, owner=ka))
    await step("owners", ledger.bag_owners(a.bag_id))
    await step("counts", ledger.counts())
    await step("keys", ledger.keys_in("applied", "failed"))
    await step("get many", ledger.get_many([ka, kb, kc]))
    # what each item's runs cost (counts, not state: no lock, any state)
    await step("bag view a", ledger.bag_view(ka, a.bag_id))
    await step("bag view, no such item", ledger.bag_view("refund:9:9:x:0", a.bag_id))
    await step("count a", ledger.add_requests(ka, 3, 1))
    await step("count a, and its record", ledger.get_counted(ka, 2, 0))
    await redis.hset(ledger.record_key(kb), "requests", "many")  # someone else's text
    await redis.hset(ledger.record_key(kb), "rate_limited", "1.5")
    await step("count b over text", ledger.add_requests(kb, 1, 1))
    await step("fleet counts", ledger.request_counts())
    # a cancel sent with no epoch check, then pending
    await step("register c", ledger.register(kc, c))
    await step("sent c", ledger.mark_sent(kc, ask_c, lock_key=lock_c, token="token-c"))
    pending_c = ask_c.to_dict() | {"phase": Phase.PENDING.value, "note": "settling"}
    await step(
        "pending c",
        ledger.mark_pending(
            kc, PendingRefund.from_dict(pending_c), lock_key=lock_c, token="token-c"
        ),
    )
    await step(
        "applied c, no refund id",
        ledger.mark_applied(kc, c.bag_id, None, reconciled=True, outcome="reconciled"),
    )
    out.append(("keyspace before the loss", await _dump(redis, epoch_name)))
    # Redis loses everything
    await lose()
    await step("get a after loss", ledger.get(ka))
    await step("count a after loss", ledger.add_requests(ka, 1, 0))
    await step("count a after loss, and its record", ledger.get_counted(ka, 1, 0))
    await step("pending c after loss", ledger.mark_pending(kc, ask_c))
    await step(
        "applied c after loss",
        ledger.mark_applied(kc, c.bag_id, 9, reconciled=False, outcome="applied"),
    )
    await step("failed c after loss", ledger.mark_failed(kc, "E", "m", outcome="failed"))
    await step("hold with no epoch", ledger.hold_sends(1_700_000_500.0))
    await step("epoch after a hold", ledger.epoch(hold=10.0, now=1_700_000_600.0))
    await lose()
    second = await step("epoch after loss", ledger.epoch(hold=25.0, now=1_700_000_700.0))
    await step("new_fleet after epoch", ledger.new_fleet(now=1_700_000_701.0))
    await step("register a from a copy", ledger.register(ka, a))
    await step(
        "sent a, the lost epoch",
        ledger.mark_sent(
            ka, ask_a, lock_key=lock_a, token="token-a", epoch=first.id, now=1_700_000_800.0
        ),
    )
    await redis.set(lock_a, "token-a2", nx=True, px=30_000)
    await step(
        "sent a, held by the new epoch",
        ledger.mark_sent(
            ka, ask_a, lock_key=lock_a, token="token-a2", epoch=second.id, now=1_700_000_710.0
        ),
    )
    await step(
        "sent a, after the hold",
        ledger.mark_sent(
            ka, ask_a, lock_key=lock_a, token="token-a2", epoch=second.id, now=1_700_000_725.0
        ),
    )
    # bag locks
    held = await locks.acquire(b.bag_id + 7, wait=0.0)
    out.append(("lock taken", held.key))
    await step("lock busy", locks.acquire(b.bag_id + 7, wait=0.0))
    await step("renew", locks.renew(held))
    await step("release", locks.release(held))
    await step("renew after release", locks.renew(held))
    out.append(("lost set", held.lost.is_set()))
    await step("release lock a, wrong token", locks.release(type(held)(lock_a, "x")))
    await step("lock a still there", redis.get(lock_a))
    # the applied write with the lane's writes and the read back in one round trip
    await step(
        "applied a, its lock let go of, read back counted",
        _listed(
            ledger.mark_applied_and_read(
                ka,
                a.bag_id,
                78,
                reconciled=False,
                outcome="applied",
                counts=(2, 0),
                release=(lock_a, "token-a2"),
            )
        ),
    )
    await step("lock a let go of", redis.get(lock_a))
    await step(
        "applied a again, read back",
        _listed(ledger.mark_applied_and_read(ka, a.bag_id, 78, reconciled=False, outcome="x")),
    )
    await step(
        "applied, no such item, read back counted",
        _listed(
            ledger.mark_applied_and_read(
                "refund:1:2:none:0", a.bag_id, 79, reconciled=False, outcome="x", counts=(1, 0)
            )
        ),
    )
    # what the keyspace holds at the end (times and random ids aside)
    out.append(("keyspace", await _dump(redis, epoch_name)))
    return out


async def _listed(call: Awaitable[tuple[Any, ...]]) -> list[Any]:
    """A tuple answer as a list (each part shown as the table shows a value)."""
    return list(await call)


async def _dump(redis: Any, epoch_name: Callable[[str], str]) -> dict[str, Any]:
    keys: list[bytes] = (
        sorted(await redis.keys(PREFIX + "*"))
        if isinstance(redis, Redis)
        else sorted(redis.server.data)
    )
    dump: dict[str, Any] = {}
    for raw in keys:
        key = raw.decode()
        if isinstance(redis, Redis):
            kind = (await redis.type(key)).decode()
            value: Any = (
                await redis.hgetall(key)
                if kind == "hash"
                else await redis.smembers(key)
                if kind == "set"
                else await redis.get(key)
            )
        else:
            value = redis.server.data[raw]
        if isinstance(value, dict):
            value = {
                k.decode(): (epoch_name(v.decode()) if k == b"id" else v.decode())
                for k, v in value.items()
                if k != b"updated_at"
            }
        elif isinstance(value, set):
            value = sorted(v.decode() for v in value)
        dump[key] = value
    return dump


async def test_the_in_memory_redis_answers_every_ledger_and_lock_step_as_redis_does(
    redis_url: str,
) -> None:
    asks = _asks()
    real = Redis.from_url(redis_url)
    try:
        await real.flushall()

        async def lose_real() -> None:
            await real.flushall()

        expected = await _scenario(real, lose_real, asks)
    finally:
        await real.aclose()
    server = MemoryRedisServer(time.time)
    memory = server.client()

    async def lose_memory() -> None:
        server.lose()

    got = await _scenario(memory, lose_memory, asks)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine == theirs
    # The scenario reached the branches that matter (not a table of no-ops).
    names = {row[0]: row for row in expected}
    assert names["sent, wrong token"][2] == "LockLostError"
    assert names["sent, other epoch"][2] == "LedgerLostError"
    assert names["sent b, held"][2] == "LedgerHeldError"
    assert names["applied b, a's refund"][2] == "RefundOwnedError"
    assert names["pending c after loss"][2] == "LedgerLostError"
    assert names["sent a, after the hold"] == ("sent a, after the hold", None)
    view = names["bag view a"][1]
    assert view[0] == "BagView"
    assert view[1] is not None  # a's record
    assert view[5] == [77]  # b's refund on the bag a shares
    assert names["bag view, no such item"][1][1] is None
    assert names["count a"] == ("count a", (3, 1))
    assert names["count b over text"] == ("count b over text", (1, 1))
    counted = names["count a, and its record"][1][0]
    assert (counted["requests"], counted["rate_limited"]) == (5, 1)  # the new totals
    assert names["fleet counts"] == ("fleet counts", {"requests": 6, "rate_limited": 2})
    assert names["count a after loss"] == ("count a after loss", None)
    assert names["lock busy"][2] == "LockBusyError"
    applied = names["applied a, its lock let go of, read back counted"][1]
    assert applied[0] == 1
    assert (applied[1][0]["state"], applied[1][0]["requests"]) == ("applied", 2)
    assert names["lock a let go of"] == ("lock a let go of", None)
    assert names["applied a again, read back"][1][0] == 0
    assert names["applied, no such item, read back counted"][1] == [-2, None]


async def test_a_closed_connection_fails_every_command_and_counts_writes() -> None:
    server = MemoryRedisServer(time.time)
    memory = server.client()
    seen: list[int] = []
    memory.on_write = seen.append
    ledger = RedisLedger(cast(Redis, memory), prefix=PREFIX)
    (ka, a), _, _ = _items()
    await ledger.register(ka, a)
    # Two writes: the bag's items set (what the same-money check reads), then the record
    # (a worker dying between them is one more crash point for ``worker_dies``).
    assert seen == [1, 2]
    memory.closed = True
    from redis.exceptions import ConnectionError as RedisConnectionError

    with pytest.raises(RedisConnectionError):
        await ledger.get(ka)
    with pytest.raises(NotImplementedError):
        memory.register_script("return 1")
    locks = BagLocks(cast(Redis, server.client()), prefix=PREFIX)
    held = await locks.acquire(5, wait=0.0)
    with pytest.raises(LockBusyError):
        await locks.acquire(5, wait=0.0)
    await locks.release(held)
    assert not server.exists(locks.key(5))


# -- merchant pacing and the fleet's rate limit ------------------------------------------


class _Clock:
    """The one clock both servers' ``TIME`` reads in the pacing scenario."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class _PinnedTime:
    """A client of the real redis-server whose scripts run with their text unchanged,
    after one line that answers ``redis.call('TIME')`` with the clock's reading (split
    into seconds and microseconds as the in-memory server splits it)."""

    def __init__(self, redis: Redis, clock: _Clock) -> None:
        self.redis = redis
        self.split = MemoryRedisServer(clock).time
        #: Script runs that read the pinned TIME (the wrapper is not a no-op).
        self.pinned = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)

    def register_script(self, text: str) -> Callable[..., Awaitable[Any]]:
        async def run(keys: Any = (), args: Any = ()) -> Any:
            seconds, micros = self.split()
            pinned = (
                "local __redis = redis local redis = {call = function(command, ...) "
                f"if command == 'TIME' then return {{'{seconds}', '{micros}'}} end "
                "return __redis.call(command, ...) end}\n"
            )
            if "redis.call('TIME')" in text:
                self.pinned += 1
            return await cast(
                Awaitable[Any], self.redis.eval(pinned + text, len(keys), *keys, *args)
            )

        return run


async def _pace_scenario(redis: Any, clock: _Clock) -> list[Any]:
    """Every FleetPace and FleetRateLimit operation the fleet uses, in states that take
    each script down each of its branches; returns what each step answered."""
    pace = FleetPace(cast(Redis, redis), 7, prefix=PREFIX)
    capped = FleetPace(cast(Redis, redis), 8, prefix=PREFIX, ceiling=2.0)
    limiter = FleetRateLimit(cast(Redis, redis), 7, 4.0, prefix=PREFIX)
    lower = FleetRateLimit(cast(Redis, redis), 7, 1.0, prefix=PREFIX)
    out: list[Any] = []

    async def step(name: str, call: Awaitable[Any]) -> Any:
        try:
            value = await call
        except Exception as exc:  # noqa: BLE001 - the error is the result compared
            out.append((name, "raised", type(exc).__name__, str(exc)))
            return None
        out.append((name, value))
        return value

    def reserve_fleet(earliest_ms: float) -> Awaitable[Any]:
        # FleetRateLimit.wait's script (wait itself sleeps for the slot).
        return limiter._reserve(keys=[limiter.key], args=[limiter.ceiling, earliest_ms])

    m1, m2, m3, m4, m5 = 20001, 20002, 20003, 20004, 20005
    # No lane yet: nothing paced, successes counted per second.
    await step("learning, none yet", pace.learning())
    await step("reserve, no lane", pace.reserve(m1, 1.0))
    await step("gate, no lane", pace.gate_slot(m1))
    await step("rate, no lane", pace.rate(m1))
    await step("merchant of an unknown order", pace.merchant_of(555))
    await step("success m1", pace.succeeded(m1, order_id=555))
    await step("success m2", pace.succeeded(m2, order_id=557))
    for n in range(5):
        await step(f"success, capped app #{n}", capped.succeeded(m1))
    clock.tick(0.3)
    await step("success m1, same second", pace.succeeded(m1))
    await step("success m3", pace.succeeded(m3))
    clock.tick(1.0)
    await step("success m1, next second", pace.succeeded(m1, order_id=556))
    clock.tick(0.02)
    await step("learn 558", pace.learn(558, m2))
    await step("learn 559, no merchant", pace.learn(559, None))
    for order in (555, 556, 557, 558, 559):
        await step(f"merchant of {order}", pace.merchant_of(order))
    # First 429s: lanes start at the rate sends got through at.
    await step("429 m1, Retry-After 0.25 s", pace.limited(m1, 0.25))
    await step("learning now", pace.learning())
    await step("429 m3, its successes the second before", pace.limited(m3, 2.0))
    await step("429 capped, over the ceiling", capped.limited(m1, 0.0))
    await step("rate m1", pace.rate(m1))
    # Slots: taken within patience, then handed back.
    for n in range(4):
        await step(f"reserve m1 #{n}", pace.reserve(m1, 1.0))
    for n in range(3):
        await step(f"gate m1 #{n}", pace.gate_slot(m1))
    # A send may wait only so long (its patience, its deadline): a slot further is not
    # taken (the next gate finds the same one), one within is.
    await step("gate m1, past its limit", pace.gate_slot(m1, 0.5))
    await step("gate m1, within its limit", pace.gate_slot(m1, 60.0))
    await step("gate m2, no lane, a limit", pace.gate_slot(m2, 0.0))
    clock.tick(3.0)
    await step("gate m1 after a while", pace.gate_slot(m1))
    await step("429 m2, its successes long ago", pace.limited(m2, 0.0))
    await step("gate m2", pace.gate(m2))
    clock.tick(1.0)
    await step("429 m2, unknown epoch, 1 / rate later", pace.limited(m2, 0.0))
    # Successes while probing (and capped).
    await step("success m1, probing", pace.succeeded(m1, order_id=560))
    await step("success capped", capped.succeeded(m1))
    # 429s: of the present epoch, a stale one, one that passed no gate, unknown.
    await step("429 m1, epoch 0", pace.limited(m1, 0.0, epoch=0))
    await step("429 m1, epoch 0 again", pace.limited(m1, 0.0, epoch=0))
    await step("429 m1, no gate", pace.limited(m1, 0.0, epoch=-1))
    await step("gate m1, epoch 1", pace.gate_slot(m1))
    await step("429 m1, unknown epoch, at once", pace.limited(m1, 0.5))
    clock.tick(5.0)
    await step("429 m1, unknown epoch, later", pace.limited(m1, 0.0))
    await step("429 m3, floor", pace.limited(m3, 30.0, epoch=0))
    # Back up: quickly toward the rate of the last 429, then slowly past it.
    for n in range(8):
        clock.tick(0.7)
        await step(f"success m1 #{n}", pace.succeeded(m1))
    await step("reserve m1, past patience", pace.reserve(m1, 0.0))
    clock.tick(math.ceil(clock.now) - clock.now + 0.05)
    await step("success m4", pace.succeeded(m4))
    await step("success m4 again", pace.succeeded(m4))
    await step("429 m4, 50 ms into its second", pace.limited(m4, 0.0))
    await step("success m5", pace.succeeded(m5))
    clock.tick(2.0)
    await step("success m5, two seconds on", pace.succeeded(m5))
    await step("429 m5", pace.limited(m5, 0.0))
    # A slowdown with slots handed out ahead (the new spacing starts after them) and
    # successes lately (what got through is its floor).
    m6 = 20006
    await step("429 m6, its lane starts", pace.limited(m6, 0.0))
    for n in range(3):
        await step(f"gate m6 ahead #{n}", pace.gate_slot(m6))
    for n in range(4):
        clock.tick(0.1)
        await step(f"success m6 lately #{n}", pace.succeeded(m6))
    await step("rate m6 before its slowdown", pace.rate(m6))
    await step("429 m6, slots ahead, let through lately", pace.limited(m6, 0.0, epoch=0))
    await step("gate m6 after the slots ahead", pace.gate_slot(m6))
    await step("reserve m6 after the slots ahead", pace.reserve(m6, 5.0))
    clock.tick(10.0)
    await step("429 m6, nothing ahead, nothing lately", pace.limited(m6, 0.0, epoch=1))
    await step("gate m6, nothing ahead", pace.gate_slot(m6))
    # The fleet's rate limit.
    await step("limit current, no key", limiter.current())
    await step("limit wait, free", limiter.wait())
    await step("limit reserve", reserve_fleet(0.0))
    await step("limit reserve, earliest later", reserve_fleet(1_000.0))
    await step("limit reserve, earliest sooner", reserve_fleet(10.0))
    await step("limit down", limiter.slow_down())
    await step("limit down at once", limiter.slow_down())
    clock.tick(0.5)
    await step("limit down, 1 / rate later", limiter.slow_down())
    for n in range(8):
        clock.tick(100.0)
        await step(f"limit down #{n}", limiter.slow_down())
    await step("limit reserve, slow", reserve_fleet(0.0))
    await step(
        "limit reserve, past its limit",
        limiter._reserve(keys=[limiter.key], args=[limiter.ceiling, 0.0, 1.0]),
    )
    await step(
        "limit reserve, within its limit",
        limiter._reserve(keys=[limiter.key], args=[limiter.ceiling, 0.0, 1e9]),
    )
    await step(
        "limit reserve, no limit",
        limiter._reserve(keys=[limiter.key], args=[limiter.ceiling, 0.0, ""]),
    )
    for n in range(25):
        await step(f"limit up #{n}", limiter.speed_up())
    await step("limit current", limiter.current())
    await step("limit, a lower ceiling", lower.current())
    await step("limit up, a lower ceiling", lower.speed_up())
    await step("limit reserve, a lower ceiling", lower._reserve(keys=[lower.key], args=[1.0, 0.0]))
    out.append(("keyspace", await _pace_dump(redis)))
    return out


async def _pace_dump(redis: Any) -> dict[str, Any]:
    """Every key, its value and whether it expires."""
    dump: dict[str, Any] = {}
    if isinstance(redis, MemoryRedis):
        for raw, value in sorted(redis.server.data.items()):
            shown = dict(value) if isinstance(value, dict) else value
            dump[raw.decode()] = (shown, raw in redis.server.expires)
        return dump
    for raw in sorted(await redis.keys(PREFIX + "*")):
        kind = (await redis.type(raw)).decode()
        value = await redis.hgetall(raw) if kind == "hash" else await redis.get(raw)
        dump[raw.decode()] = (value, await redis.pttl(raw) > 0)
    return dump


async def test_the_in_memory_redis_paces_merchants_and_limits_the_fleet_as_redis_does(
    redis_url: str,
) -> None:
    real = Redis.from_url(redis_url)
    try:
        await real.flushall()
        real_clock = _Clock()
        pinned = _PinnedTime(real, real_clock)
        expected = await _pace_scenario(pinned, real_clock)
    finally:
        await real.aclose()
    assert pinned.pinned > 50  # every script read TIME through the pin
    clock = _Clock()
    got = await _pace_scenario(MemoryRedisServer(clock).client(), clock)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine == theirs
    # The scenario reached the branches that matter (not a table of no-ops).
    rows = dict(expected)
    assert rows["reserve, no lane"] is None
    assert rows["learning now"] is True
    assert rows["merchant of 558"] == 20002
    assert rows["429 capped, over the ceiling"] == 2.0
    assert rows["reserve m1 #0"] > 0
    assert rows["reserve m1 #3"] < 0
    assert rows["gate m1 #2"][0] > rows["gate m1 #1"][0] > 0
    assert rows["gate m1, epoch 1"][1] == 1
    past, within = rows["gate m1, past its limit"], rows["gate m1, within its limit"]
    assert past[0] < -0.5
    assert within[0] == -past[0] > rows["gate m1 #2"][0]  # the same slot: none was taken
    assert rows["gate m2, no lane, a limit"] is None
    assert rows["429 m1, epoch 0 again"] == rows["429 m1, no gate"] == rows["429 m1, epoch 0"]
    assert rows["429 m1, unknown epoch, later"] < rows["429 m1, unknown epoch, at once"]
    assert rows["429 m2, unknown epoch, 1 / rate later"] == 0.8
    # Its two successes came the same instant, its first ever: counted over half a
    # second (the batch's rule), not over the second before it, when it sent nothing.
    assert rows["429 m4, 50 ms into its second"] == pytest.approx(2 / 0.5)
    before = rows["rate m6 before its slowdown"]
    kept = rows["429 m6, slots ahead, let through lately"]
    assert kept == pytest.approx(before * KEEP)  # its floor: more than DECREASE keeps
    assert rows["429 m6, nothing ahead, nothing lately"] == pytest.approx(kept * DECREASE)
    # The last slot handed out (0.4 s ago) was at `ahead`, the next free one 1 / its
    # rate then; the lane knows it as the next free slot less 1 / the rate it slowed
    # from (a little later when successes raised the rate since: never sooner).
    ahead, first = rows["gate m6 ahead #2"][0], rows["429 m6, its lane starts"]
    after = ahead - 0.4 + 1 / first - 1 / before + 1 / kept
    assert after > ahead - 0.4 + 1 / kept
    # (slots are kept to a tenth of a millisecond)
    assert rows["gate m6 after the slots ahead"] == (pytest.approx(after, abs=1e-3), 1)
    assert rows["gate m6, nothing ahead"] == (pytest.approx(1 / (kept * DECREASE), abs=1e-3), 2)
    assert float(rows["limit reserve"]) > 0
    assert float(rows["limit reserve, earliest sooner"]) > 0
    past = float(rows["limit reserve, past its limit"])
    assert past < -1.0  # nothing taken: the same slot is free within a wider limit
    assert float(rows["limit reserve, within its limit"]) == -past
    assert float(rows["limit reserve, no limit"]) > -past
    assert rows["limit down at once"] == rows["limit down"] == 2.0
    assert rows["limit down, 1 / rate later"] == 1.0
    assert rows["limit down #7"] == 4.0 / 64
    assert rows["limit current"] == 4.0
    assert rows["limit, a lower ceiling"] == 1.0
    lane = rows["keyspace"][PREFIX + ":pace:7:20001"][0]
    assert lane[b"epoch"] == b"2"
    assert float(lane[b"peak"]) > float(lane[b"rate"]) > 0.95 * float(lane[b"peak"])


def test_every_fleet_script_has_an_in_memory_copy_and_no_copy_is_stale() -> None:
    """The in-memory Redis finds a script's copy by the script's text: a script edited
    (or added) without its copy is refused when registered, which fails the simulator's
    worker mode and the parity tests above. And no copy outlives its script."""
    registered: list[str] = []

    class Recorder:
        def register_script(self, text: str) -> None:
            registered.append(text)

    recorder = cast(Redis, Recorder())
    RedisLedger(recorder, fleet_key="k" * 32)
    BagLocks(recorder)
    FleetPace(recorder, 1)
    FleetRateLimit(recorder, 1, 1.0)
    assert len(registered) == 15
    assert set(registered) == set(_SCRIPTS)
    memory = MemoryRedisServer(time.time).client()
    for text in registered:
        memory.register_script(text)
        with pytest.raises(NotImplementedError):
            memory.register_script(text.replace("local", "local ", 1) + " ")
