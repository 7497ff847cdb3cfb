"""Review 30: the late answer's wait and write-through, and the bag marked by a call cut
in a 429 wait (``PendingAsks.cut_while_absent``), against hostile servers."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Step, serve
from .test_review27_findings import AMOUNT, NoDate, _client


async def _until(check: object, clock: FakeClock) -> None:
    for _ in range(2000):
        if callable(check) and check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("never happened")


async def test_a_repeat_cut_before_its_read_keeps_the_bag_marked() -> None:
    """A call cut in a 429 wait marks its bag; the repeat of its request spends the
    mark as it begins, before its read. Cut by its caller during that read (or before
    it), nothing it did is pending: the mark was gone, and the next repeat was sent
    with no baseline, answered 500, and took another system's identical refund made
    in the first wait for its own."""
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
        # The repeat: its read hangs, and its caller cuts it there.
        server.hang_reads = True
        repeat = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        await _until(lambda: server.reads >= 1, clock)
        repeat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await repeat
        assert server.posts == 1
        server.hang_reads = False
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund handed over as the repeat's own"
    )
