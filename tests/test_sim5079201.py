"""An identical repeat that waits for its bag behind the resume of its own pending
record is sent blind once that resume made the refund (simulator seed 5079201).

The story (``python benchmarks/simulate.py --kinds all --seed 5079201``, direct mode):
A2 refunds a whole bag; its POST gets a 502 (nothing committed) and its read-backs
find nothing. Its caller cancels the call: the record stays pending on the bag. At that
instant another caller's identical call (A0) gets BagPendingError and resumes that
record (it "joins" A2), and A2's caller repeats its call (a new call, same request, no
key). The resume holds the bag, proves absence, re-sends and gets the refund. The
repeat, which waited for the bag (``BagLocks``), only then runs ``PendingAsks.check``:
the resume took the record off the bag, so nothing is pending, and the repeat is sent
with no read. Violet answers 400 "Bag is REFUNDED" and A2's caller is told its refund
failed, while the refund of its own record was made (and handed to A0's caller).

For a partial refund it is worse: the blind repeat makes a second refund of the same
amount (parametrized ``amount`` case below: two refunds for one caller's one refund).

The pending check was made only once the call held the bag: the record that was
pending when the call came (on the bag, or being resumed by the call that held it) was
no longer seen. Now a new ask (no key) of the same request as a record pending, or
being resumed, when it comes is told BagPendingError with that record once it holds
the bag (nothing sent); resuming the record returns its refund with no request, as
the caller that joined it was handed.

Run it: pytest -q -p no:cacheprovider --no-cov tests/test_sim5079201.py
"""

from __future__ import annotations

import asyncio

import pytest

from violet_async import (
    BagPendingError,
    CancelBagRequest,
    OrderRefund,
    PendingRefund,
    RefundBagRequest,
    VioletError,
)
from violet_async._reconcile import PendingAsks
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_502, ORDER_ID, Hostile, Step, hostile_client

REASON = "Damaged in transit  "


@pytest.mark.parametrize("amount", [None, 250], ids=["whole-bag", "amount"])
async def test_a_repeat_behind_its_records_resume_is_not_sent_blind(amount: int | None) -> None:
    clock = FakeClock()
    # The first POST: a gateway 502, nothing committed. The next (the resume's re-send,
    # absence proven): committed, answered. Any POST after that is the repeat's.
    server = Hostile(clock, script=[Step(502, body=GATEWAY_502, commit_after=None), Step()])
    async with hostile_client(server) as client:

        def call() -> asyncio.Future[OrderRefund]:
            return asyncio.ensure_future(
                client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=amount, reason=REASON)
            )

        first = call()  # A2
        clock.call_later(15.0, first.cancel)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert server.posts == 1
        clock.advance(60.0)  # past the record's settle window: a resume can prove absence

        # A0: an identical call of another caller is refused; it resumes the record.
        with pytest.raises(BagPendingError) as refused:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=amount, reason=REASON)
        record = refused.value.pending[0]
        joined = asyncio.ensure_future(client.resume(record))
        await asyncio.sleep(0)  # the resume takes the bag and the record off it

        # A2's caller repeats its cancelled call: it waits for the bag.
        repeat = call()
        got = await joined
        assert server.ours == [got.id]
        try:
            again: OrderRefund | VioletError = await repeat
        except VioletError as exc:
            again = exc
        # Nothing sent by the repeat: it is told the record that was pending on the
        # bag when it came, whose resume returns the refund already made.
        assert server.posts == 2, f"the repeat was sent blind: {again!r}"
        assert server.ours == [got.id], "a second refund for one caller's one refund"
        assert isinstance(again, BagPendingError), again
        assert [p.ask_id for p in again.pending] == [record.ask_id]
        assert (await client.resume(again.pending[0])).id == got.id
        assert server.posts == 2


def test_alike_sees_records_pending_or_being_resumed_of_the_same_request() -> None:
    """The seed's own ordering: the repeat came while the record was still on the bag
    (the resume waited for the bag behind a third call); or while a resume held it."""
    asks = PendingAsks()
    body = RefundBagRequest(reason=REASON)
    like = PendingRefund("refund", ORDER_ID, BAG_ID, body)
    on_bag = PendingRefund("refund", ORDER_ID, BAG_ID, body)
    other = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=5))
    cancel = PendingRefund("cancel", ORDER_ID, BAG_ID, CancelBagRequest())
    asks.add(on_bag)
    asks.add(other)
    assert asks.alike(like) == (on_bag,)
    resumed = PendingRefund("refund", ORDER_ID, BAG_ID, body)
    asks.resuming(resumed)
    asks.resuming(cancel)
    assert asks.alike(like) == (on_bag, resumed)
    asks.resumed(resumed)
    asks.resumed(cancel)
    assert asks.alike(like) == (on_bag,)
    assert not asks._resuming
