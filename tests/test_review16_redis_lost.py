"""Review 16: a RedisStore whose Redis lost its data (a server scripted here: ``Hostile``
of ``test_review16_findings``), fixed: the store's epoch (``RedisStore``) marks a new
ask of a key it may have lost ``KeyEntry.guard``, and the keyed call reads the bag
before it sends and holds when a refund exactly like it is already there."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund, RefundAlreadyPresentError
from violet_async._ask import PendingRefund, Phase
from violet_async.exceptions import RequestValidationError
from violet_async.stores import Claim, KeyEntry, RedisStore
from violet_async.testing import FakeClock

from ._fleet_redis import redis_url  # noqa: F401 - the fixture
from .test_review16_findings import BAG, ORDER, REQUEST, Hostile, _client, _ended, _serve

# -- 2. a RedisStore whose Redis restarted empty ------------------------------------------


async def test_a_keyed_repeat_after_redis_lost_its_data_sends_nothing_blind(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Scenario: ``VIOLET_STORE=redis://...`` (the arq example's setup). Worker one's
    keyed refund is applied by Violet, answered with its own 500, and its deadline parks
    it pending: the key's entry in Redis says so. Redis then restarts empty (no
    persistence, or a failover to a replica that had not received the write; here its
    keys are deleted). The job (or the web app's retry) runs the call again with the
    same key, in worker two.

    Main: worker two's claim found nothing under the key and owned a fresh ask: the
    request was sent again at once, no read-back: a second refund.

    Fixed: the store's epoch went with the data; worker two's claim finds it gone (or
    young) and marks the key's new ask guarded: it reads the bag first, finds a refund
    exactly like it that nothing accounts for, and is held (``RefundAlreadyPresentError``,
    nothing sent). A later repeat of the key, by a store whose epoch is long settled, is
    held again (the key keeps its guard). One refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok", "ok"])
    prefix = "review16-lost:"
    key = "rma-review16-redis-lost"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as one_store,
        RedisStore(redis_url, prefix=prefix) as two_store,
        RedisStore(redis_url, prefix=prefix) as three_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, deadline=600.0, store=two_store) as two,
        _client(url, clock, deadline=600.0, store=three_store) as three,
    ):
        server.hide = True  # the list lags: worker one's deadline parks it pending
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        server.hide = False
        lost = await one_store._redis.keys(f"{prefix}*")
        assert lost  # the key's pending entry
        await one_store._redis.delete(*lost)  # Redis restarted empty
        clock.advance(120.0)
        again = await _ended(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
        assert isinstance(again, (OrderRefund, AmbiguousOutcomeError, RefundAlreadyPresentError)), (
            repr(again)
        )
        # Long after, the epoch settled: the key's repeat is still held, never sent.
        await three_store._redis.hset(three_store.epoch_key, "created", "0")
        clock.advance(3600.0)
        later = await _ended(three.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(later, (AmbiguousOutcomeError, RefundAlreadyPresentError)), repr(later)
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"


async def test_a_guarded_key_with_no_refund_like_it_on_the_bag_is_sent_once(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """A store whose epoch is young (a process just started on a Redis whose epoch it
    made) guards the key: the bag is read first, holds nothing like it, and the refund
    is sent once (no false hold)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["ok"])
    prefix = "review16-young:"
    key = "rma-review16-young"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as store,
        _client(url, clock, store=store) as client,
    ):
        await store._redis.delete(store.epoch_key)
        refund = await client.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key)
        entry = await store.load(f"{client._keys.scope} {key}")  # type: ignore[union-attr]
    assert isinstance(refund, OrderRefund)
    assert server.posts == 1
    assert len(server.made) == 1
    assert server.list_reads >= 1  # read before the send
    assert entry is not None
    assert entry.guard
    assert entry.refund is not None


async def test_a_store_known_to_be_new_sends_without_a_read(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """``new_store`` starts an epoch that was never young: the first claims are not
    guarded (no read before the send); it does nothing on a store that has one."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["ok"])
    prefix = "review16-new:"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as store,
        _client(url, clock, store=store) as client,
    ):
        await store._redis.delete(store.epoch_key)
        assert await store.new_store()
        assert not await store.new_store()
        refund = await client.refund_bag(ORDER, BAG, REQUEST, idempotency_key="rma-new")
    assert isinstance(refund, OrderRefund)
    assert server.posts == 1
    assert server.list_reads == 0


def _fresh(key: str, owner: str = "me") -> KeyEntry:
    ask = PendingRefund("refund", ORDER, BAG, REQUEST)
    return KeyEntry(key, ask, owner=owner, lease_until=1e12, scope="s")


async def test_the_epoch_is_checked_in_the_claims_own_transaction(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Redis loses the epoch between the claim reading it (settled, old) and writing
    the key: the write fails (the epoch is watched), the claim reads again, and the
    key's new ask is guarded. Without the watch it would be written unguarded."""
    prefix = "review16-atomic:"
    async with (
        RedisStore(redis_url, prefix=prefix) as store,
        RedisStore(redis_url, prefix=prefix) as other,
    ):
        await store._redis.delete(store.epoch_key)
        assert await store.new_store()
        claim, entry = await store.claim(_fresh("a"), 1.0)
        assert claim is Claim.OWNED
        assert not entry.guard
        real = store._read
        cut: list[bool] = []

        async def lose_it_meanwhile(pipe: Any, name: str) -> tuple[Any, Any]:
            seen = await real(pipe, name)
            if not cut:
                cut.append(True)
                await other._redis.delete(other.epoch_key)  # Redis lost its data
            return seen

        store._read = lose_it_meanwhile  # type: ignore[method-assign]
        claim, entry = await store.claim(_fresh("b"), 1.0)
        stored = await store.load("b")
    assert cut
    assert claim is Claim.OWNED
    assert entry.guard
    assert stored is not None
    assert stored.guard


async def test_a_replaced_epoch_guards_a_store_that_saw_the_old_one(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """A store that saw one epoch finds another (made by a process after Redis lost
    the data, even one made as 'new'): guarded. The key keeps its guard through its
    owner's saves and a failed ask's fresh retry."""
    prefix = "review16-replaced:"
    async with (
        RedisStore(redis_url, prefix=prefix) as store,
        RedisStore(redis_url, prefix=prefix) as other,
    ):
        await store._redis.delete(store.epoch_key)
        assert await store.new_store()
        assert not (await store.claim(_fresh("a"), 1.0))[1].guard
        await other._redis.delete(other.epoch_key)
        assert await other.new_store()  # wrongly said new: the store knows better
        claim, entry = await store.claim(_fresh("b"), 1.0)
        assert claim is Claim.OWNED
        assert entry.guard
        failed = attrs.evolve(
            PendingRefund("refund", ORDER, BAG, REQUEST), phase=Phase.FAILED, note="not applied"
        )
        assert await store.save(KeyEntry("b", failed, finished_at=2.0, scope="s"), "me")
        kept = await store.load("b")
        assert kept is not None
        assert kept.guard
        claim, entry = await other.claim(_fresh("b", owner="you"), 3.0)
        assert claim is Claim.OWNED
        assert entry.guard
        assert entry.lineage
        # Keys that were never guarded, on a settled epoch, stay unguarded.
        assert not (await other.claim(_fresh("c"), 3.0))[1].guard


def test_hold_must_be_seconds() -> None:
    with pytest.raises(RequestValidationError, match="hold"):
        RedisStore("redis://127.0.0.1:1/0", hold=0)


def test_a_guard_is_kept_in_the_entry_and_left_out_when_unset() -> None:
    entry = _fresh("k")
    assert b"guard" not in entry.to_json()  # MemoryStore / SQLiteStore rows unchanged
    guarded = KeyEntry.from_json(KeyEntry("k", entry.ask, guard=True, scope="s").to_json())
    assert guarded.guard
