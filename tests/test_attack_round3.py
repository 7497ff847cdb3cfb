"""Attacks on round 3's own fixes, each on a server scripted here: the ways a double
refund or a false outcome could still come out of the new rules (owned refunds,
remembered candidates, checked 2xx answers, dates with a baseline, unsure clocks)."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import AmbiguousOutcomeError, PendingRefund, RetryPolicy
from violet_async.testing import FakeClock

from .hostile import BAG_ID as BAG
from .hostile import GATEWAY_502, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
BASELINE = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0, read_before_send=True)


async def test_a_replayed_answer_of_another_calls_refund_is_not_this_calls() -> None:
    """Call 1 gets refund R (200). Call 2, same amount: a cache replays R's 200 and
    nothing commits. R is never handed to call 2 as its own: read back, and since R
    is another call's it proves nothing either way: review, no second POST."""
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY) as client:
        first = await client.refund_bag(ORDER_ID, BAG, amount_refunded=300)
        replay = {k: v for k, v in server.refunds[0].items() if not k.startswith("_")}
        server.script = [Step(200, answer=replay, commit_after=None)]
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.answered
    assert [r.id for r in info.value.candidates] == [first.id]
    assert server.posts == 2
    assert len(server.ours) == 1


async def test_a_replica_behind_the_baseline_never_proves_absence() -> None:
    """read_before_send sees another system's refund F; our POST commits and a gateway
    answers 504; every later read comes from a replica that shows neither F nor ours
    for the whole window. Missing F makes every read stale: pending, never re-sent."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504)])
    server.add_refund(100, age=10.0)
    async with hostile_client(server, retry=BASELINE) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG, amount_refunded=300))
        await server.post_arrived.wait()
        server.replica_behind = 1_000.0
        with pytest.raises(AmbiguousOutcomeError) as info:
            await call
    assert info.value.pending is not None
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_two_clients_in_one_process_resume_one_record_to_one_refund() -> None:
    """A resume delivered to two clients of one process (two job handlers): neither
    knows the other's refund, both find the same one; one POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)])
    async with (
        hostile_client(server, retry=RetryPolicy(deadline=20.0)) as one,
        hostile_client(server, retry=RetryPolicy(deadline=20.0)) as two,
    ):
        with pytest.raises(AmbiguousOutcomeError) as info:
            await one.refund_bag(ORDER_ID, BAG, amount_refunded=300)
        pending = info.value.pending
        assert pending is not None
        clock.advance(60.0)
        got = [await one.resume(pending), await two.resume(pending)]
    assert [r.id for r in got] == [server.ours[0]] * 2
    assert server.posts == 1


async def test_with_a_baseline_a_foreign_refund_dated_before_the_send_is_not_claimed() -> None:
    """read_before_send; another system's identical refund made 10 minutes before our
    send shows only after the baseline (a lagging list); ours never applied. Dates do
    not rule it out, but a precise date before the send by a sure clock keeps it from
    being claimed: review, never a false success, never a re-send."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(502, GATEWAY_502, commit_after=None)])
    foreign = server.add_refund(300, age=600.0)
    foreign["_visible_at"] = clock.monotonic() + 3.0
    async with hostile_client(server, retry=BASELINE) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert server.posts == 1
    assert server.ours == []


async def test_a_resume_cannot_launder_review_through_json() -> None:
    """A record parked for review, stored as JSON and resumed after the window with an
    empty list from a replica: still review, never a send."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504)], naive_dates=True)
    async with hostile_client(server, retry=ROOMY) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG, amount_refunded=300)
        pending = info.value.pending
        assert pending is not None
        assert pending.needs_review
        server.replica_behind = 10_000.0
        clock.advance(120.0)
        stored = PendingRefund.from_json(pending.to_json())
        with pytest.raises(AmbiguousOutcomeError) as again:
            await client.resume(stored)
    assert again.value.pending is not None
    assert again.value.pending.needs_review
    assert server.posts == 1
