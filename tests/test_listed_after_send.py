"""A refund that appeared after the send is never "made long before the send".

Simulator seed 1115630: a client made after its machine's wall clock stepped 15 h
ahead, behind a load balancer whose ``Date`` headers were 15 h ahead too (both
readings of Violet's clock agree, and both are wrong); Violet dates refunds on its
own clock. The ask's POST applied and was answered 502. The first read after it did
not list the refund yet; the next ones did, dated 15 h before the send by every
reading: skipped as an old refund, the ask was proven absent after its settle window
and sent again. Two refunds. A list does not hide a refund made hours ago: one that
the first read after the send did not list appeared since, and goes to review.

Scripted on tests/hostile.py's server and a FakeClock shared with the client; refunds
are counted by the server's own record."""

from __future__ import annotations

import pytest

from violet_async import AmbiguousOutcomeError, RetryPolicy
from violet_async._ask import PendingRefund
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_502, ORDER_ID, Hostile, Step, hostile_client

HOURS_15 = 15 * 3600.0
AMOUNT = 300


def _world() -> tuple[FakeClock, Hostile]:
    clock = FakeClock()
    # Violet's clock (its refund dates) is the machine's true time; the client is
    # made after its wall clock stepped 15 h ahead, and every Date header is 15 h
    # ahead of Violet's own clock too.
    server = Hostile(
        clock,
        script=[Step(502, GATEWAY_502, commit_after=0.0), Step(200)],
        list_lag=3.0,
        header_skew=HOURS_15,
    )
    clock.step_wall(HOURS_15)
    return clock, server


async def test_a_refund_listed_only_after_the_first_read_is_not_old() -> None:
    _clock, server = _world()
    async with hostile_client(server, retry=RetryPolicy(max_attempts=4, deadline=None)) as c:
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await c.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert server.posts == 1, "sent again over its own refund"
    assert len(server.refunds) == 1
    pending = caught.value.pending
    assert pending is not None
    assert pending.listed_after_send == frozenset()


async def test_a_resume_elsewhere_keeps_what_the_first_read_listed() -> None:
    """The record travels (a job queue, a journal): a resume in another client made
    after the same step judges by the listing it carries."""
    clock, server = _world()
    policy = RetryPolicy(max_attempts=4, deadline=2.0)  # ends pending before it lists
    async with hostile_client(server, retry=policy) as first:
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    record = caught.value.pending
    assert record is not None
    assert record.listed_after_send == frozenset()
    carried = PendingRefund.from_dict(record.to_dict())
    assert carried.listed_after_send == frozenset()
    clock.advance(120.0)  # long past the settle window
    async with hostile_client(server, retry=RetryPolicy(max_attempts=4, deadline=30.0)) as second:
        with pytest.raises(AmbiguousOutcomeError):
            await second.resume(carried)
    assert server.posts == 1, "the resume sent it again over its own refund"


def test_records_without_the_listing_read_as_before() -> None:
    """A record written before the field existed has none (every refund's date judged as
    it was); one with it writes it, and two copies keep only what both listed."""
    from violet_async._ask import merged
    from violet_async.models import RefundBagRequest

    ask = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=AMOUNT))
    data = ask.to_dict()
    assert "listed_after_send" not in data
    assert PendingRefund.from_dict(data).listed_after_send is None
    one = PendingRefund.from_dict({**data, "listed_after_send": [1, 2]})
    other = PendingRefund.from_dict({**data, "listed_after_send": [2, 3]})
    assert merged(one, other).listed_after_send == frozenset({2})
    assert merged(one, ask).listed_after_send == frozenset({1, 2})
