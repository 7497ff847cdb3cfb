"""Never twice, the holes an outsider found (issue 24's money-core rows, issue 27's
lagging bag status): each against our own hostile server, asserting the server's own
count of refunds and that what the caller saw is true (pending and review are true
outcomes; a false success or a second refund is not)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from violet_async import AmbiguousOutcomeError, PendingRefund, RetryPolicy
from violet_async._reconcile import KnownRefunds
from violet_async.testing import FakeClock

from .hostile import (
    BAG_ID,
    GATEWAY_502,
    GATEWAY_504,
    ORDER_ID,
    VIOLET_500,
    Hostile,
    Step,
    hostile_client,
)

#: Virtual time costs nothing: a deadline long enough for every settle window.
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
BASELINE = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0, read_before_send=True)
#: 20:00 UTC: a send late in the day, so a day-precision date is 20 h "before" it.
EVENING = datetime(2026, 3, 4, 20, 0, tzinfo=timezone.utc).timestamp()
HOUR = 3600.0


async def _pending_of(call: object) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call  # type: ignore[misc]
    assert info.value.pending is not None
    return info.value.pending


# -- row 1: a resume delivered twice ---------------------------------------------------


async def test_row1_a_resume_delivered_twice_returns_the_same_refund() -> None:
    """The call ends pending (the commit lands after its deadline); a job queue delivers
    the resume twice in one client: both get the one refund, nothing is re-sent."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.advance(60.0)
        first = await client.resume(pending)
        second = await client.resume(PendingRefund.from_json(pending.to_json()))
    assert first.id == second.id == server.ours[0]
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_row1_a_resume_that_re_sent_delivered_again_returns_that_refund() -> None:
    """The first send never applied; the first resume proves it absent and re-sends
    (one refund); the same resume delivered again returns that refund: no third POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.advance(120.0)
        first = await client.resume(pending)
        second = await client.resume(pending)
    assert not first.reconciled
    assert first.id == second.id == server.ours[0]
    assert server.posts == 2
    assert len(server.ours) == 1


async def test_row1_two_resumes_of_one_record_at_once_share_its_refund() -> None:
    """The same resume delivered twice at the same moment: one waits for the other's
    bag, then finds the refund the first one got."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.advance(120.0)
        first, second = await asyncio.gather(client.resume(pending), client.resume(pending))
    assert first.id == second.id == server.ours[0]
    assert len(server.ours) == 1


# -- row 2: a candidate seen, then a replica that misses it ------------------------------


async def test_row2_a_candidate_seen_then_missed_by_a_replica_is_never_absence() -> None:
    """A read-back shows our refund with a date that cannot place it (parked for
    review); the resume reads a replica 8 s behind that misses it: a stale read, never
    absence, and a record parked for review never re-sends by itself."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(500, VIOLET_500)], naive_dates=True)
    async with hostile_client(server, retry=ROOMY) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        assert pending.needs_review
        assert pending.seen == frozenset(server.ours)
        server.replica_behind = 8.0
        clock.advance(6.0)
        again = await _pending_of(client.resume(pending))
    assert again.needs_review
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_row2_a_flapping_replica_never_proves_absence() -> None:
    """A 504 whose refund commits 1 s later; every other read comes from a replica
    30 s behind: the refund shows, hides and shows. One POST, and the refund is found
    (a read that shows it is a match; one that hides it proves nothing)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=1.0)])
    server.replica_behind, server.flap = 30.0, True
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.id == server.ours[0]
    assert server.posts == 1


# -- row 3: a 2xx naming another order or bag ---------------------------------------------


@pytest.mark.parametrize("other", [{"bag_id": BAG_ID + 1}, {"order_id": ORDER_ID + 1}])
async def test_row3_a_200_naming_another_bag_is_read_back(other: dict[str, int]) -> None:
    """Ours committed, but the 200 names another bag (or order): never returned as this
    call's; read back, and our own refund is found."""
    server = Hostile(FakeClock(), script=[Step(200, answer=other)])
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.reconciled
    assert (refund.bag_id, refund.order_id) == (BAG_ID, ORDER_ID)
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_row3_a_200_of_another_bags_refund_with_nothing_found_is_pending() -> None:
    """A 200 answering another bag's refund while nothing shows on ours: a 2xx is never
    followed by a re-send, and never a success: pending for review."""
    foreign = {"id": 1, "order_id": ORDER_ID + 1, "bag_id": BAG_ID + 1, "amount": 300}
    foreign |= {"merchant_id": 1, "app_id": 11, "transaction_id": 1}
    foreign |= {"gateway_transaction_id": "pi_x", "status": "COMPLETED"}
    server = Hostile(FakeClock(), script=[Step(200, answer=foreign, commit_after=None)])
    async with hostile_client(server, retry=ROOMY) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
    assert pending.answered
    assert pending.needs_review
    assert server.posts == 1
    assert server.ours == []


async def test_row3_a_200_for_another_amount_is_read_back() -> None:
    """A 200 whose refund has another amount than asked: not this request's answer."""
    server = Hostile(FakeClock(), script=[Step(200, answer={"amount": 999})])
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert (refund.amount, refund.reconciled) == (300, True)
    assert server.posts == 1


# -- rows 5 and 6: with a baseline, a date never rules out; only a precise one rules in --


async def test_row5_a_date_header_15_hours_ahead_with_a_baseline() -> None:
    """read_before_send, every Date header 15 h ahead of the refund dates: whether our
    refund's date is after the send depends on which clock is right, and being new
    since the baseline proves nothing (the baseline may be a replica behind). Pending
    for review with ours as the candidate; one POST, never a second refund."""
    server = Hostile(
        FakeClock(), script=[Step(504, GATEWAY_504, commit_after=2.5)], header_skew=15 * HOUR
    )
    async with hostile_client(server, retry=BASELINE) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert [r.id for r in info.value.candidates] == server.ours
    assert server.posts == 1


async def test_row6_day_precision_dates_with_a_baseline() -> None:
    """read_before_send, refund dates with the day only (T00:00:00Z), sent at 20:00:
    our refund is the only candidate, but a day cannot place it after the send, and a
    baseline from a replica behind could have missed another system's refund of that
    day: pending for review with ours as the candidate. One POST."""
    clock = FakeClock(wall_start=EVENING)
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=2.5)], day_dates=True)
    async with hostile_client(server, retry=BASELINE) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert [r.id for r in info.value.candidates] == server.ours
    assert server.posts == 1


async def test_row6_day_precision_dates_without_a_baseline_are_never_absence() -> None:
    """The same without a baseline: a day-precision date cannot place our refund
    before or after the send: pending for review, never re-sent."""
    clock = FakeClock(wall_start=EVENING)
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=2.5)], day_dates=True)
    async with hostile_client(server, retry=ROOMY) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
    assert pending.needs_review
    assert server.posts == 1
    assert len(server.ours) == 1


# -- rows 7-9: clocks that step or lie ---------------------------------------------------


async def test_row7_wall_clock_steps_back_15h_during_the_post() -> None:
    """The POST commits and a gateway answers 504 while this machine's wall clock steps
    back 15 h (NTP): the step is seen (wall against monotonic time), and our refund is
    found. One POST."""
    server = Hostile(FakeClock(), script=[Step(504, GATEWAY_504, wall_step=-15 * HOUR)])
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.reconciled
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_row7_wall_clock_steps_back_during_a_baseline_ask() -> None:
    """The same with read_before_send (the driver's own send): found, one POST."""
    server = Hostile(FakeClock(), script=[Step(504, GATEWAY_504, wall_step=-15 * HOUR)])
    async with hostile_client(server, retry=BASELINE) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.reconciled
    assert server.posts == 1


async def test_row8_a_date_header_3h_behind_never_claims_an_older_refund() -> None:
    """No baseline; a CDN's Date header 3 h behind Violet's refund dates; another
    system's refund of the same amount an hour old; ours never applied (502). The old
    refund is never returned as ours: pending for review, nothing re-sent."""
    server = Hostile(
        FakeClock(),
        script=[Step(502, GATEWAY_502, commit_after=None)],
        header_skew=-3 * HOUR,
    )
    old = server.add_refund(300, age=HOUR)
    async with hostile_client(server, retry=ROOMY) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert [r.id for r in info.value.candidates] == [old["id"]]
    assert server.posts == 1
    assert server.ours == []


async def test_row9_wall_clock_steps_forward_3h_never_claims_an_older_refund() -> None:
    """The wall clock steps forward 3 h during the POST (ours never applies); an hour
    old identical refund is on the bag: never returned as ours, nothing re-sent."""
    server = Hostile(
        FakeClock(), script=[Step(502, GATEWAY_502, commit_after=None, wall_step=3 * HOUR)]
    )
    server.add_refund(300, age=HOUR)
    async with hostile_client(server, retry=ROOMY) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
    assert pending.needs_review
    assert pending.clock_unsure
    assert server.posts == 1
    assert server.ours == []


async def test_disagreeing_date_headers_make_the_clock_unsure() -> None:
    """The POST's gateway stamps a Date 3 h behind, the reads a true one: the readings
    disagree, and an hour-old identical refund is never claimed."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(502, GATEWAY_502, commit_after=None)])
    server.add_refund(300, age=HOUR)
    async with hostile_client(server, retry=ROOMY) as client:
        server.header_skew = -3 * HOUR
        task = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        await server.post_arrived.wait()
        server.header_skew = 0.0
        pending = await _pending_of(task)
    assert pending.offsets is not None
    assert pending.needs_review
    assert server.posts == 1


# -- row 15: a 2xx is never followed by a re-send -----------------------------------------


async def test_row15_an_unreadable_200_is_read_back_and_found() -> None:
    """Committed, answered 200 with a body that cannot be read: read back, found."""
    server = Hostile(FakeClock(), script=[Step(200, garbled=True)])
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.reconciled
    assert server.posts == 1


async def test_row15_an_unreadable_200_never_re_sends_when_the_list_lags() -> None:
    """The same with a list lagging 60 s (beyond settle_lag): pending for review, never
    a re-send; the resume after the lag finds it."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, garbled=True)], list_lag=60.0)
    async with hostile_client(server, retry=ROOMY) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        assert pending.answered
        again = await _pending_of(client.resume(PendingRefund.from_json(pending.to_json())))
        assert server.posts == 1
        clock.advance(60.0)
        refund = await client.resume(again)
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_row15_an_unreadable_202_to_a_cancel_is_read_back() -> None:
    """A cancel answered 202 with a body that cannot be read: read back (the bag's
    status still lagging), found; never a definite failure, never re-sent."""
    server = Hostile(FakeClock(), script=[Step(202, garbled=True)], status_lag=600.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.cancel_bag(ORDER_ID, BAG_ID)
    assert refund.reconciled
    assert refund.id == server.ours[0]
    assert server.posts == 1


# -- issue 27 row 3: a bag status that lags -----------------------------------------------


@pytest.mark.parametrize("kind", ["full", "cancel"])
async def test_a_whole_bag_ask_is_found_while_the_bag_status_lags(kind: str) -> None:
    """A whole-bag refund (or cancel) commits, Violet answers 500, and the bag still
    reads COMPLETED for 10 minutes: the refund of what was left is ours. One POST."""
    server = Hostile(FakeClock(), script=[Step(500, VIOLET_500)], status_lag=600.0)
    async with hostile_client(server, retry=ROOMY) as client:
        if kind == "full":
            refund = await client.refund_bag(ORDER_ID, BAG_ID)
        else:
            refund = await client.cancel_bag(ORDER_ID, BAG_ID)
    assert refund.reconciled
    assert refund.amount == server.total
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_a_whole_bag_refund_does_not_claim_another_partial_while_status_lags() -> None:
    """Another system's 300 of 1000 is on the bag (status lagging); our whole-bag
    refund never applied (502): that partial is not ours, absence is proven after the
    window, and the one re-send refunds what was left."""
    server = Hostile(
        FakeClock(), script=[Step(502, GATEWAY_502, commit_after=None)], status_lag=600.0
    )
    server.add_refund(300, age=1.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID)
    assert (refund.amount, refund.reconciled) == (700, False)
    assert server.posts == 2
    assert len(server.ours) == 1


def test_known_refunds_are_keyed_by_the_ask_that_owns_them() -> None:
    """An ask sees its own refund as its own, every other call's as another's; a later
    owner is remembered for a refund first added without one."""
    known = KnownRefunds()
    known.add(1, BAG_ID, "ask-a")
    known.add(2, BAG_ID)
    known.add(2, BAG_ID, "ask-b")
    assert 1 not in known.besides("ask-a")
    assert 1 in known.besides("ask-b")
    assert 2 in known.besides("ask-a")
    assert known.owned_by("ask-b") == frozenset({2})
    assert known.on_bag(BAG_ID, besides="ask-a") == frozenset({2})


async def test_a_wall_clock_step_between_a_call_and_its_resume() -> None:
    """The call parks (its commit lands 50 s after the 504); the wall clock steps 3 h
    forward; the resume comes at once. The settle window is still running by monotonic
    time: read back, pending again, never re-sent; a later resume finds the refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=50.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.step_wall(3 * HOUR)
        again = await _pending_of(client.resume(pending))
        assert server.posts == 1
        clock.advance(60.0)
        refund = await client.resume(again)
    assert refund.id == server.ours[0]
    assert server.posts == 1


@pytest.mark.parametrize("applied", [True, False])
async def test_a_record_that_cannot_be_read_is_never_a_claim_nor_absence(applied: bool) -> None:
    """The bag's list holds a record that cannot be read (skipped and counted): our
    refund beside it is not claimed, and a list without ours is not absence. Review,
    one POST at most, whether ours applied or not."""
    step = Step(504, GATEWAY_504, commit_after=0.0 if applied else None)
    server = Hostile(FakeClock(), script=[step], garbage=1)
    async with hostile_client(server, retry=ROOMY) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
    assert pending.needs_review
    assert server.posts == 1
    assert len(server.ours) == (1 if applied else 0)
