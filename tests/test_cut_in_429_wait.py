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
    *, same_request: bool, then: int | None = None, later: float = 0.0
) -> tuple[NoDate, OrderRefund, int]:
    """The cut call, its repeat, and (``then``: an amount) one more call, ``later``
    seconds after the cut at the earliest, whose reads are counted in ``server.reads``."""
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
        cut_at = clock.monotonic()
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
            clock.advance(max(0.0, cut_at + later - clock.monotonic()))
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


async def test_every_new_ask_reads_first_while_the_mark_holds() -> None:
    """The mark is not spent by the repeat's read: the call after it, within the
    mark's life (about two minutes by default), reads first too."""
    server, _, _ = await _cut_then_repeat(same_request=True, then=100)
    assert server.reads > 0
    assert len(server.ours) == 2


@pytest.mark.parametrize(("later", "reads"), [(125.5, 1), (126.5, 0)])
async def test_a_mark_lapses_after_twice_the_clock_skew_and_the_date_tolerance(
    later: float, reads: int
) -> None:
    """A refund made before the cut is older than any window a send opens
    2 x clock_skew (60 s) + date_tolerance (5 s) + 1 s later: such a send reads
    nothing first; one just before reads the bag."""
    server, _, _ = await _cut_then_repeat(same_request=True, then=100, later=later)
    assert server.reads == reads
    assert len(server.ours) == 2


def test_a_mark_holds_for_its_life_on_both_clocks() -> None:
    """Any ask on the bag reads first until ``life`` has passed on the monotonic clock
    and on the wall clock (a wall clock stepped back keeps it); lapsed marks are
    dropped, and a client with none left is empty again."""
    asks = PendingAsks()
    asks.cut_while_absent(7, 100.0, 5_000.0, 125.0)
    assert asks.read_first(7, 101.0, 5_001.0)
    assert asks.read_first(7, 101.0, 5_001.0), "not spent by a read"
    assert not asks.read_first(8, 101.0, 5_001.0), "another bag"
    assert asks.read_first(7, 300.0, 4_000.0), "the wall clock stepped back"
    assert asks.read_first(7, 200.0, 9_000.0), "the wall clock stepped forward"
    assert not asks.read_first(7, 225.0, 5_125.0)
    assert not asks


def test_a_later_mark_extends_the_bags() -> None:
    asks = PendingAsks()
    asks.cut_while_absent(7, 100.0, 5_000.0, 125.0)
    asks.cut_while_absent(7, 110.0, 5_010.0, 125.0)
    asks.cut_while_absent(7, 105.0, 5_005.0, 125.0)
    assert asks.read_first(7, 230.0, 5_130.0)
    assert not asks.read_first(7, 235.0, 5_135.0)


def test_lapsed_marks_of_other_bags_are_dropped() -> None:
    asks = PendingAsks()
    asks.cut_while_absent(1, 0.0, 0.0, 10.0)
    asks.cut_while_absent(2, 5.0, 5.0, 10.0)
    assert not asks.read_first(3, 12.0, 12.0)
    assert asks.read_first(2, 12.0, 12.0)
    assert not asks.read_first(1, 12.0, 12.0)
    assert not asks.read_first(2, 15.0, 15.0)
    assert not asks


def test_the_bags_to_read_first_are_bounded() -> None:
    """The client remembers at most READ_FIRST_BOUND such bags, the latest ones."""
    asks = PendingAsks()
    assert not asks
    for bag in range(READ_FIRST_BOUND + 1):
        asks.cut_while_absent(bag, 0.0, 0.0, 60.0)
    assert asks
    assert not asks.read_first(0, 1.0, 1.0)
    assert asks.read_first(READ_FIRST_BOUND, 1.0, 1.0)
