"""What the simulator's kinds of review 14 and 15's classes (``_kinds_review``) found on
the code they were built on, each against the server review 14 scripted
(``tests/test_review14_findings.py``, refunds counted by its own record), on a virtual
clock. Each test names the scenario, what the SDK did, and the true outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from violet_async import AmbiguousOutcomeError, BagPendingError, OrderRefund
from violet_async.batch import BatchItem, BatchResult, run_batch
from violet_async.testing import FakeClock

from .samples import refund_body
from .test_review11_findings import _ended, _stamp
from .test_review14_findings import BAG, ORDER, REQUEST, Scripted, _client, _serve


class _CancelledInWait(FakeClock):
    """A virtual clock whose first long sleep (a 429's ``Retry-After`` wait) is
    cancelled ``after`` seconds in, as a caller (or a crash) cancels the call."""

    def __init__(self, after: float) -> None:
        super().__init__(wall_start=1_700_000_000.0)
        self.after = after
        self.cut = False
        #: The task cancelled (default: the one sleeping).
        self.victim: asyncio.Task[object] | None = None

    async def sleep(self, seconds: float) -> None:
        if seconds >= 10.0 and not self.cut:
            self.cut = True
            self.sleeps.append(self.after)
            self.advance(self.after)
            task = self.victim or asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        await super().sleep(seconds)


def _others_refund(start: float) -> dict[str, object]:
    """The merchant's admin refunds the same 5.00 on the bag 10 s after the first POST
    (listed COMPLETED, like one of this app's)."""
    return refund_body(
        id=9_999,
        order_id=ORDER,
        bag_id=BAG,
        amount=500,
        status="COMPLETED",
        skus=[],
        errors=[],
        date_created=_stamp(start + 10.0),
        date_last_modified=_stamp(start + 10.0),
    )


async def test_a_batch_run_cut_during_a_429_wait_does_not_take_a_refund_made_in_it(
    tmp_path: Path,
) -> None:
    """Scenario (simulator ``refund_in_429``, batch seed 110): a batch row's POST is
    answered 429 with ``Retry-After: 20`` (nothing applied). While the run waits,
    another system refunds the same 5.00 on the bag (10 s after the POST); the run
    ends 15 s in (the process is stopped). The next run with the same journal
    resumes the row.

    Before: the journal's last line for the row said "sent" (the 429 was never
    written), so the next run read the bag back as after a send of unknown outcome:
    the other system's refund, dated after that send, was taken for the row's own,
    ``succeeded``, and the shopper's refund never made.

    True outcome: the next run knows every send so far was proven not applied and
    sends the row anew: one refund of its own (two on the bag, one each)."""
    clock = _CancelledInWait(after=15.0)
    server = Scripted(clock, ["busy"])
    server.retry_after = "20"
    start = clock.time()
    clock.call_later(10.0, lambda: server.made.append(_others_refund(start)))
    journal = tmp_path / "rows.journal.jsonl"
    items = [BatchItem(1, "refund", ORDER, BAG, REQUEST)]
    async with _serve(server) as url:
        async with _client(url, clock, deadline=600.0, attempts=4) as client:
            run = asyncio.ensure_future(_results(run_batch(client, items, journal=journal)))
            clock.victim = run
            first = await _stopped(run)
        async with _client(url, clock, deadline=600.0, attempts=4) as client:
            second = [r async for r in run_batch(client, items, journal=journal)]
    assert not first, first
    assert server.posts == 2, f"{server.posts} POSTs"
    (result,) = second
    assert result.refund_id != 9_999, "the row took the other system's refund for its own"
    assert result.outcome == "succeeded", result
    assert server.on_bag(BAG) == [9_999, result.refund_id]


async def _results(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [r async for r in results]


async def _stopped(run: asyncio.Future[list[BatchResult]]) -> list[BatchResult]:
    """What a batch run stopped in its wait yielded (nothing: it was stopped)."""
    try:
        return await run
    except asyncio.CancelledError:
        return []


async def test_a_call_cancelled_during_a_429_wait_leaves_no_claim_on_a_refund_made_in_it() -> None:
    """Scenario: a call's POST is answered 429 with ``Retry-After: 20`` (nothing
    applied). While it waits, another system refunds the same 5.00 on the bag (10 s
    after the POST); the caller cancels the call 15 s in and calls again: told the bag
    has its ask pending, it resumes that record (as the error says).

    True outcome: the resume never returns the other system's refund as the call's
    own (it sends anew, or is pending or for review)."""
    clock = _CancelledInWait(after=15.0)
    server = Scripted(clock, ["busy"])
    server.retry_after = "20"
    start = clock.time()
    clock.call_later(10.0, lambda: server.made.append(_others_refund(start)))
    async with _serve(server) as url, _client(url, clock, deadline=600.0, attempts=4) as client:
        try:
            cut: object = await asyncio.ensure_future(client.refund_bag(ORDER, BAG, REQUEST))
        except asyncio.CancelledError as exc:
            cut = exc
        again = await _ended(client.refund_bag(ORDER, BAG, REQUEST))
        if isinstance(again, BagPendingError):
            again = await _ended(client.resume(again.pending[0]))
    assert isinstance(cut, BaseException), cut
    assert server.posts <= 2
    if isinstance(again, OrderRefund):
        assert again.id != 9_999, "the call took the other system's refund for its own"
    else:
        assert isinstance(again, AmbiguousOutcomeError), repr(again)
