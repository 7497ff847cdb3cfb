"""The simulator's in-memory Redis against a real redis-server: one table of ledger and
bag-lock scenarios, run through the real RedisLedger and BagLocks on each, must give
identical results (every reply, every error, every key left behind). The simulator's
fleet runs on the in-memory one; this is what keeps its copy of the Lua scripts from
drifting away from the scripts silently."""

from __future__ import annotations

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
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, LockBusyError, RedisLedger, item_key
from violet_async.testing.sim._redis import MemoryRedisServer

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
    # what the keyspace holds at the end (times and random ids aside)
    out.append(("keyspace", await _dump(redis, epoch_name)))
    return out


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
    assert names["lock busy"][2] == "LockBusyError"


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
