"""Cancellation-safe calls: a call its caller cancels (or times out) after its request
may have left leaves the bag pending before the cancellation propagates, so the next
call gets BagPendingError carrying the record, never a blind second POST. Each test
cancels at one ``await`` of the money path, on our hostile server or on FakeViolet."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import (
    BagPendingError,
    PendingRefund,
    RetryPolicy,
)
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)


@attrs.define
class Gated(Hostile):
    """The hostile server with its first login, or every POST, held until a gate opens."""

    login_gate: asyncio.Event | None = None
    post_gate: asyncio.Event | None = None
    logins: int = 0

    async def _login(self, request: web.Request) -> web.Response:
        self.logins += 1
        if self.login_gate is not None and self.logins == 1:
            await self.login_gate.wait()
        return await super()._login(request)

    async def _post(self, request: web.Request, *, cancel: bool) -> web.StreamResponse:
        if self.post_gate is not None:
            await self.post_gate.wait()
        return await super()._post(request, cancel=cancel)


async def _until(predicate: Any) -> None:
    """Let the event loop run until ``predicate()`` holds (no real sleeping)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def test_cancelled_with_the_post_held_leaves_the_bag_pending() -> None:
    """The POST reached Violet and is held; the caller cancels: the next call on the bag
    is refused with the pending record (no second POST); resuming it after the commit
    lands returns the one refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
    async with hostile_client(server, retry=ROOMY) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        await server.post_arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BagPendingError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        assert server.posts == 1
        [pending] = info.value.pending
        assert pending.sends == 1
        assert pending.doubted
        # Settled no earlier than a request still running at Violet could commit.
        assert pending.settle_until is not None
        assert pending.settle_until >= clock.time() + ROOMY.settle_running - 1e-6
        stored = PendingRefund.from_json(pending.to_json())
        refund = await client.resume(stored)
    assert refund.reconciled
    assert refund.id == server.ours[0]
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_a_caller_timeout_by_wait_for_is_a_cancel_too() -> None:
    """asyncio.wait_for on a held POST (a web handler's request timeout): pending, and
    the repeated call is refused, never sent."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
    async with hostile_client(server, retry=ROOMY) as client:

        async def timed() -> None:
            await asyncio.wait_for(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300), 30)

        call = asyncio.ensure_future(timed())
        await server.post_arrived.wait()
        # wait_for's own timer fires as a cancel of the inner call: same path, no wait.
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BagPendingError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert server.posts == 1


async def test_a_real_wait_for_timeout_leaves_the_bag_pending() -> None:
    """A real asyncio.wait_for timeout (0.2 s) with the POST held: TimeoutError for the
    caller, the bag pending for the next call, one POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
    async with hostile_client(server, retry=ROOMY) as client:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300), 0.2)
        with pytest.raises(BagPendingError):
            await client.cancel_bag(ORDER_ID, BAG_ID)
    assert server.posts == 1


async def test_cancelled_while_logging_in_leaves_nothing_pending() -> None:
    """Cancelled before the request could leave (the login is still running): nothing
    pending, and the next call sends: one POST in all."""
    gate = asyncio.Event()
    server = Gated(FakeClock(), login_gate=gate)
    async with hostile_client(server, retry=ROOMY) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        await _until(lambda: server.logins == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        gate.set()
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert not refund.reconciled
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_cancelled_while_waiting_for_the_bag_leaves_nothing_pending() -> None:
    """A second call waiting for the bag's lock is cancelled: it sent nothing, so the
    first call's success leaves the bag free."""
    gate = asyncio.Event()
    server = Gated(FakeClock(), post_gate=gate)
    async with hostile_client(server, retry=ROOMY) as client:
        first = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=100))
        await _until(lambda: client._shared.bag_locks.held(BAG_ID))
        waiting = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=200))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        await first
        again = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=200)
    assert again.amount == 200
    assert server.posts == 2


async def test_cancelled_during_the_read_back_after_a_504_leaves_the_bag_pending() -> None:
    """A 504, then the read-back hangs and the caller cancels: pending (the POST may
    have applied), refused for the next call, resumed to the one refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=1.0)], hang_reads=True)
    async with hostile_client(server, retry=ROOMY) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        await _until(lambda: server.reads >= 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BagPendingError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        [pending] = info.value.pending
        server.hang_reads = False
        clock.advance(ROOMY.settle_running)
        refund = await client.resume(pending)
    assert refund.reconciled
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_cancelled_resume_puts_its_record_back() -> None:
    """A resume cancelled mid-read leaves the record pending again (it was taken off
    the bag when the resume began)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
    async with hostile_client(server, retry=ROOMY) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        await server.post_arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BagPendingError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        [pending] = info.value.pending
        server.hang_reads = True
        reads = server.reads
        resuming = asyncio.ensure_future(client.resume(pending))
        await _until(lambda: server.reads > reads)
        resuming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await resuming
        with pytest.raises(BagPendingError) as again:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        assert again.value.pending[0].first_sent_at == pending.first_sent_at
    assert server.posts == 1


async def test_fake_violet_held_post_cancelled_then_repeated() -> None:
    """FakeViolet's TIMEOUT_THEN_COMMIT holds the POST; the caller cancels and repeats:
    refused, then resumed once the commit lands: one refund on the bag."""
    clock = FakeClock()
    plan = FaultPlan(late_commit_delay=2.5, hang_seconds=600.0)
    async with FakeViolet(orders=1, clock=clock, faults=plan) as fake:
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.TIMEOUT_THEN_COMMIT, bag_id=bag_id)
        async with fake.client(retry=ROOMY, clock=clock) as client:
            call = asyncio.ensure_future(client.refund_bag(order_id, bag_id, amount_refunded=100))
            await fake.wait_held(1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            with pytest.raises(BagPendingError) as info:
                await client.refund_bag(order_id, bag_id, amount_refunded=100)
            clock.advance(ROOMY.settle_running)
            refund = await client.resume(info.value.pending[0])
        assert refund.reconciled
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert len(fake.ledger.posts_per_bag[bag_id]) == 1
