"""FakeViolet learns the faults of never-twice round 3 (a replica that flaps, Date
headers hours off or disagreeing, day-precision dates, a 2xx naming another bag), and
the client keeps to one refund and a true outcome on each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import attrs
import pytest

from violet_async import AmbiguousOutcomeError, PendingRefund
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan, ServerQuirks

from .conftest import ROOMY_POLICY, make_client, ours

HOUR = 3600.0
EVENING = datetime(2026, 3, 4, 20, 0, tzinfo=timezone.utc).timestamp()


async def _fake(clock: FakeClock, **quirks: Any) -> AsyncIterator[FakeViolet]:
    plan = FaultPlan(quirks=ServerQuirks(**quirks))
    async with FakeViolet(orders=4, seed=5, clock=clock, faults=plan) as server:
        yield server


async def _pending(call: Any) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call
    assert info.value.pending is not None
    return info.value.pending


async def test_a_flapping_replica_never_turns_a_seen_candidate_into_absence() -> None:
    """Violet's 500 after the commit, naive dates (our refund is for review); reads
    alternate between the primary and a replica 8 s behind: the resume reads the
    replica, misses the refund, and still never re-sends."""
    clock = FakeClock()
    async for fake in _fake(clock, replica_behind=8.0, replica_flap=True, naive_dates=True):
        order_id, bag_id = fake.seeded[0]
        async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
            fake.script("refund", Fault.HTTP_500_AFTER_COMMIT, bag_id=bag_id)
            pending = await _pending(client.refund_bag(order_id, bag_id, amount_refunded=100))
            assert pending.needs_review
            clock.advance(6.0)
            again = await _pending(client.resume(pending))
        assert again.needs_review
        assert fake.ledger.requests["refund"] == 1
        assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_a_date_header_hours_off_never_claims_an_older_refund() -> None:
    """A Date header 3 h behind, another system's identical refund an hour old, our
    request dropped before it applied: never returned as ours, never re-sent."""
    clock = FakeClock()
    async for fake in _fake(clock, date_header_skew=-3 * HOUR):
        order_id, bag_id = fake.seeded[0]
        fake.another_actor_refund(order_id, bag_id, 100, age_seconds=HOUR)
        async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
            fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
            pending = await _pending(client.refund_bag(order_id, bag_id, amount_refunded=100))
        assert pending.needs_review
        assert ours(fake, bag_id) == []


async def test_disagreeing_date_headers_are_kept_as_a_range() -> None:
    """Every other answer's Date is 3 h behind: the record keeps both readings (the
    clock is unsure from then on); the call's deadline parks it, nothing re-sent."""
    clock = FakeClock()
    async for fake in _fake(clock, date_header_skew=-3 * HOUR, date_header_flap=True):
        order_id, bag_id = fake.seeded[0]
        policy = attrs.evolve(ROOMY_POLICY, deadline=20.0)
        async with make_client(fake, clock, retry=policy) as client:
            fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
            pending = await _pending(client.refund_bag(order_id, bag_id, amount_refunded=100))
        assert pending.offsets is not None
        assert pending.offsets[1] - pending.offsets[0] > 2 * HOUR
        assert pending.clock_unsure
        assert fake.ledger.requests["refund"] == 1


@pytest.mark.parametrize("baseline", [True, False])
async def test_day_precision_dates(baseline: bool) -> None:
    """Refund dates with the day only, sent at 20:00 UTC, the commit late: a day
    cannot place our refund after the send, with a baseline or without (the baseline
    may be a replica behind): for review, ours the only candidate. Never re-sent."""
    clock = FakeClock(wall_start=EVENING)
    async for fake in _fake(clock, day_dates=True):
        order_id, bag_id = fake.seeded[0]
        policy = attrs.evolve(ROOMY_POLICY, read_before_send=baseline)
        async with make_client(fake, clock, retry=policy) as client:
            fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
            with pytest.raises(AmbiguousOutcomeError) as info:
                await client.refund_bag(order_id, bag_id, amount_refunded=100)
            assert info.value.pending is not None
            assert info.value.pending.needs_review
            assert [r.id for r in info.value.candidates] == ours(fake, bag_id)
        assert fake.ledger.requests["refund"] == 1
        assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_a_2xx_naming_another_bag_is_read_back(fake: FakeViolet, clock: FakeClock) -> None:
    """WRONG_BAG_ANSWER: committed, the 200 names another bag: never returned as
    this call's; read back, our refund is found. One POST."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.WRONG_BAG_ANSWER, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert (refund.bag_id, refund.reconciled) == (bag_id, True)
    assert refund.id == ours(fake, bag_id)[0]
    assert fake.ledger.requests["refund"] == 1
