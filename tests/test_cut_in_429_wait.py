"""A call cut by its caller while it waits out a 429 leaves nothing pending (every
send it made was proven not applied), but its bag was in play: another system may
have refunded the same amount during the wait. The caller's repeat without a key is a
new ask; sent with no baseline, a Violet 500 to it, and a read-back that lists the
other system's refund, it took that refund for its own (simulator seed 1216220). A
new ask on a bag where this client cut such a wait reads the bag before its send."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund
from violet_async._reconcile import READ_FIRST_BOUND, PendingAsks
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Step, serve
from .test_review27_findings import AMOUNT, NoDate, _client


async def _cut_then_repeat(
    *, same_request: bool, then: int | None = None
) -> tuple[NoDate, OrderRefund, int]:
    """The cut call, its repeat, and (``then``: an amount) one more call after it, whose
    reads before its send are counted in ``server.reads_before_then``."""
    clock = FakeClock()
    script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    server = NoDate(clock, script=script)
    async with serve(server) as url, _client(url, clock, MemoryStore()) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        clock.call_later(3.0, lambda: server.add_refund(AMOUNT))
        clock.call_later(5.0, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert server.posts == 1
        other = server.refunds[0]["id"]
        reason = None if same_request else "Damaged in transit"
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, reason=reason
            )
        except AmbiguousOutcomeError as exc:
            got = exc
        if then is not None:
            reads = server.reads
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=then)
            server.reads -= reads
    assert isinstance(got, OrderRefund), got
    return server, got, other


@pytest.mark.parametrize("same_request", [True, False], ids=["same-request", "other-reason"])
async def test_a_repeat_after_a_cut_429_wait_never_takes_anothers_refund(
    same_request: bool,
) -> None:
    server, got, other = await _cut_then_repeat(same_request=same_request)
    assert got.id != other, "another system's refund handed over as the repeat's own"
    assert server.ours == [got.id]


async def test_the_read_first_is_spent_by_the_repeat() -> None:
    """The repeat reads first, once: the call after it sends at once (no read)."""
    server, _, _ = await _cut_then_repeat(same_request=True, then=100)
    assert server.reads == 0
    assert len(server.ours) == 2


def test_every_new_ask_reads_first_until_one_of_the_cut_request_has() -> None:
    """Another request on the bag reads first too (another ask may take the bag before
    the repeat: seed 1216220's cancel did) and leaves the mark; the repeat spends it."""
    asks = PendingAsks()
    begun = asks.marks
    asks.cut_while_absent(7, b"asked")
    assert asks.read_first(7, b"another", asks.marks) == (True, False)
    assert asks.read_first(7, b"asked", begun) == (True, False), "begun before the cut"
    assert asks.read_first(7, b"asked", asks.marks) == (True, True)
    assert asks.read_first(7, b"asked", asks.marks) == (False, False)
    assert not asks


def test_the_bags_to_read_first_are_bounded() -> None:
    """The client remembers at most READ_FIRST_BOUND such bags, the latest ones."""
    asks = PendingAsks()
    assert not asks
    for bag in range(READ_FIRST_BOUND + 1):
        asks.cut_while_absent(bag, b"asked")
    assert asks
    assert asks.read_first(0, b"asked", asks.marks) == (False, False)
    assert asks.read_first(READ_FIRST_BOUND, b"asked", asks.marks) == (True, True)
    assert asks.read_first(READ_FIRST_BOUND, b"asked", asks.marks) == (False, False)
