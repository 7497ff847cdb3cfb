"""Review 19: attacks on the re-send saved "not sent" until it leaves (a 429's wait
records the ask ABSENT; the stamp right before the request leaves records it SENT).

Each test scripts its own server (tests/hostile.py) on a FakeClock shared with the
client; refunds are counted by the server's own record."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund, RecordStoreError, RetryPolicy
from violet_async._ask import Phase
from violet_async.stores import Claim, KeyEntry, MemoryStore
from violet_async.testing import FakeClock

from . import _fleet_redis
from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key

RETRY = RetryPolicy(max_attempts=3, deadline=120.0)
AMOUNT = 300
KEY = "rma-review19"


async def _outcome(call: object) -> OrderRefund | BaseException:
    try:
        return await call  # type: ignore[misc,no-any-return]
    except (AmbiguousOutcomeError, RecordStoreError) as exc:
        return exc


@attrs.define
class FailingStamp:
    """A MemoryStore whose save of the re-send's SENT record (the stamp, right before
    the request leaves) fails once, as a store that went away for a moment does."""

    inner: MemoryStore = attrs.Factory(MemoryStore)
    failed: int = 0
    saved: list[KeyEntry] = attrs.Factory(list)

    @property
    def lease(self) -> float:
        return self.inner.lease

    @property
    def retention(self) -> float:
        return self.inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        ask = entry.ask
        if ask.phase is Phase.SENT and ask.sends == 2 and entry.owner and not self.failed:
            self.failed += 1
            raise ConnectionError("store unreachable")
        self.saved.append(entry)
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_resend_whose_stamp_could_not_be_saved_is_left_not_sent() -> None:
    """A keyed call's POST is answered 429; the re-send's record is saved "not sent"
    while it waits; right before it leaves, saving it as sent fails: nothing leaves and
    the caller is told so. The key must keep the record that says "not sent": given
    back holding the stamp that never left, the caller's repeat read the bag back and
    took another system's refund of the same amount, made after that stamp, for its
    own (a refund it never made reported as made)."""
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[Step(429, commit_after=None, headers={"Retry-After": "20"})],
    )
    store = FailingStamp()
    async with hostile_client(server, retry=RETRY, store=store) as client:
        first = await _outcome(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        assert isinstance(first, RecordStoreError), first
        assert store.failed == 1
        assert server.posts == 1, "nothing left after the failed stamp"
        clock.advance(5.0)
        other = server.add_refund(AMOUNT)["id"]
        clock.advance(5.0)
        got = await _outcome(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as this call's"
        assert server.ours == [got.id]
    assert len(server.ours) <= 1


@attrs.define
class SlowReply:
    """A MemoryStore whose save of a SENT record with ``sends`` sends lands at once and
    answers ``takes`` seconds (shared clock) later, as a store whose reply is slow."""

    clock: FakeClock
    sends: int
    takes: float
    inner: MemoryStore = attrs.Factory(MemoryStore)
    slow: int = 0

    @property
    def lease(self) -> float:
        return self.inner.lease

    @property
    def retention(self) -> float:
        return self.inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        saved = await self.inner.save(entry, owner)
        ask = entry.ask
        if ask.phase is Phase.SENT and ask.sends == self.sends and entry.owner:
            self.slow += 1
            await self.clock.sleep(self.takes)
        return saved

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_caller_cancelled_while_the_resends_stamp_is_saved_leaves_it_not_sent() -> None:
    """A keyed call's POST is answered 429; right before the re-send leaves its record
    is saved as sent, and the store's answer is slow; the caller cancels meanwhile.
    Nothing left: the caller's repeat with the key must not read the bag back as if it
    had, taking another system's refund of the same amount for its own."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(429, commit_after=None, headers={"Retry-After": "20"})])
    store = SlowReply(clock, sends=2, takes=10.0)
    async with hostile_client(server, retry=RETRY, store=store) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        clock.call_later(25.0, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert store.slow >= 1
        assert server.posts == 1, "nothing left after the cancel"
        other = server.add_refund(AMOUNT)["id"]
        clock.advance(5.0)
        got = await _outcome(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as this call's"
        assert server.ours == [got.id]
    assert len(server.ours) <= 1


async def test_a_caller_cancelled_during_the_login_before_a_first_send_left_nothing() -> None:
    """A keyed call's first send waits for a slow login (its record saved as sent
    before it); another system refunds the same amount meanwhile and the caller
    cancels before the request leaves. The repeat must not take that refund."""
    clock = FakeClock()
    server = Hostile(clock, login_delay=30.0)
    async with hostile_client(server, retry=RETRY, store=MemoryStore()) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        clock.call_later(10.0, lambda: server.add_refund(AMOUNT))
        clock.call_later(20.0, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert server.posts == 0, "nothing left before the cancel"
        other = server.refunds[0]["id"]
        server.login_delay = 0.0
        got = await _outcome(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as this call's"
        assert server.ours == [got.id]
    assert len(server.ours) <= 1


# -- the fleet: a worker stopped while its re-send waits out a 429 ---------------------


async def test_a_fleet_run_stopped_waiting_to_send_again_after_a_429_left_nothing(
    redis_url: str, fleet_key: str
) -> None:
    """A fleet item's POST is answered 429 (Retry-After 20 s; the fleet is unpaced, so
    the worker waits it out itself); another system refunds the same amount during the
    wait and the worker's run is stopped (the process killed, arq's job timeout) before
    the re-send leaves. The ledger must not keep the first send's record ("sent at t0,
    may have applied"): the next run reads the bag back and took that other refund for
    the item's own (a refund never made reported as made)."""
    from redis.asyncio import Redis

    from violet_async.fleet import RedisLedger

    from .hostile import serve
    from .test_fleet_loss_review import _client
    from .test_issue24_fleet import ITEM, KEY, _until_done, _worker

    redis = Redis.from_url(redis_url)
    await redis.flushall()
    await RedisLedger(redis).new_fleet()
    clock = FakeClock()
    server = Hostile(clock, script=[Step(429, commit_after=None, headers={"Retry-After": "20"})])
    other: list[int] = []
    try:
        async with serve(server) as url:
            async with _client(url, clock) as first:
                worker = _worker(first, redis, merchant_pace=False)
                await worker.ledger.register(KEY, ITEM)
                run = asyncio.ensure_future(worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM)))
                await server.post_arrived.wait()
                clock.call_later(10.0, lambda: other.append(server.add_refund(AMOUNT)["id"]))
                clock.call_later(15.0, run.cancel)
                with pytest.raises(asyncio.CancelledError):
                    await run
            assert other, "the other system's refund was made during the wait"
            assert server.posts == 1, "nothing more left before the stop"
            async with _client(url, clock) as second:
                worker = _worker(second, redis, merchant_pace=False)
                result = await _until_done(worker, clock)
    finally:
        await redis.aclose()
    assert result.get("refund_id") not in other, (
        f"another system's refund recorded as the item's: {result}"
    )
    # Run anew: the read before its send finds a refund like it, and holds it.
    assert (result["state"], result["outcome"]) == ("failed", "already_present"), result
    assert server.posts == 1
    assert server.ours == []


# -- what held: a CDN's Date and a step, now that a window-opening re-send is sure -------

HOUR = 3600.0
GATEWAY = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"


@pytest.mark.parametrize("step", [15 * HOUR, -15 * HOUR])
@pytest.mark.parametrize("when", ["before the call", "during the 429's wait"])
async def test_a_cdn_date_agreeing_with_a_step_never_proves_a_resends_refund_absent(
    step: float, when: str
) -> None:
    """Seed 605311's class, through the re-send that opens its window anew (its record
    no longer unsure): a CDN stamps every ``Date`` 15 h off Violet's refund dates, and
    this machine's wall clock steps by as much (before the call, or while it waits out
    a 429), so the ``Date`` agrees with it. The re-send gets a gateway's 504 and commits
    13 s later. Its refund is found, or the call ends pending: never a third POST."""
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": "20"}),
            Step(504, GATEWAY, commit_after=13.0),
        ],
        header_skew=step,
    )
    async with hostile_client(server, retry=RETRY) as client:
        if when == "before the call":
            clock.advance(5.0)
            clock.step_wall(step)
            clock.advance(5.0)
        else:
            clock.call_later(5.0, lambda: clock.step_wall(step))
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
    assert server.posts == 2
    assert len(server.ours) == 1
    if isinstance(got, OrderRefund):
        assert got.id == server.ours[0]
    else:
        assert isinstance(got, AmbiguousOutcomeError), got


@attrs.define
class Behind:
    """Another host's clock: the shared virtual clock with its wall time ``by`` seconds
    behind (its own monotonic time, its sleeps advance the shared clock)."""

    clock: FakeClock
    by: float

    def monotonic(self) -> float:
        return self.clock.monotonic() + 7.0

    def time(self) -> float:
        return self.clock.time() - self.by

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)


@pytest.mark.parametrize("by", [40.0, 8.0, -40.0])
async def test_a_resend_record_resumed_on_another_hosts_clock_opens_its_window_there(
    by: float,
) -> None:
    """Host A's keyed call is answered 429 (its record learns Violet's clock from the
    ``Date``, on A's clock) and stops while it waits: the key holds its record "not
    sent". Host B, whose wall clock is ``by`` seconds off A's, takes the key over once
    A's lease ran out and sends (a gateway's 504, nothing applied). Its window opens at
    its own send on its own clock: another system's refund of the same amount, made 30
    s before B's send, is never B's."""
    from violet_async import VioletClient

    from .hostile import APP_ID, SECRET, serve

    clock = FakeClock()
    server = Hostile(
        clock,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": "60"}),
            Step(504, GATEWAY, commit_after=None),
        ],
    )
    store = MemoryStore(lease=30.0)
    other = 0
    async with serve(server) as url:
        options = {
            "username": "hostile-user",
            "password": "hostile-password-0123",
            "base_url": url,
            "store": store,
            "retry": RETRY,
        }
        async with VioletClient(APP_ID, SECRET, clock=clock, **options) as host_a:
            call = asyncio.ensure_future(
                host_a.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
            )
            clock.call_later(10.0, call.cancel)
            with pytest.raises(asyncio.CancelledError):
                await call
        assert server.posts == 1
        entry = await store.load(next(iter(store._entries)))
        assert entry is not None
        assert entry.ask.phase is Phase.ABSENT
        clock.advance(40.0)
        other = server.add_refund(AMOUNT)["id"]
        clock.advance(30.0)
        async with VioletClient(APP_ID, SECRET, clock=Behind(clock, by), **options) as host_b:
            got = await _outcome(
                host_b.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
            )
    # B reads the bag before its send (review 27): the other refund is listed there,
    # never B's; the 504'd send is proven absent after its window and sent once more.
    assert server.posts == 3
    assert isinstance(got, OrderRefund), got
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]


@attrs.define
class SlowRenewal(Hostile):
    """A server whose token renewal takes ``renew_for`` seconds, during which
    ``during`` runs (another system's refund)."""

    renew_for: float = 15.0
    during: list[object] = attrs.Factory(list)

    async def _refresh(self, request: Any) -> Any:
        await self.clock.sleep(self.renew_for / 2)
        self.during.append(self.add_refund(AMOUNT)["id"])
        await self.clock.sleep(self.renew_for / 2)
        return await super()._refresh(request)


EXPIRED = b'{"status": 401, "message": "Token has expired", "error_code": 11}'


async def test_a_token_renewal_between_the_resends_stamp_and_its_send_opens_its_window_after() -> (
    None
):
    """A keyed call's POST is answered 429; the re-send (stamped "sent" as it leaves) is
    answered 401, token expired; the renewal takes 15 s, and another system refunds the
    same amount during it; the POST sent again after it gets a gateway's 504, nothing
    applied. The 401 proved nothing applied: the window opens at the POST after the
    renewal, and that other refund is never this call's."""
    clock = FakeClock()
    server = SlowRenewal(
        clock,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": "20"}),
            Step(401, EXPIRED, commit_after=None),
            Step(504, GATEWAY, commit_after=None),
        ],
    )
    async with hostile_client(server, retry=RETRY, store=MemoryStore()) as client:
        got = await _outcome(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
    assert server.during, "the other system's refund was made during the renewal"
    assert server.posts >= 3
    assert not isinstance(got, OrderRefund) or got.id not in server.during, (
        "another system's refund handed over as this call's"
    )
    assert len(server.ours) <= 1
