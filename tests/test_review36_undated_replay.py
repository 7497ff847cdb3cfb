"""Review 36: review 35's replayed 2xx, naming a refund whose date places nothing.

The story (review 35's, tests/test_review35_2xx_after_mark.py): a call waits out a 429
(``Retry-After: 20``); another system refunds the same amount 0.3 s before the caller
cuts the call as the wait ends; the caller repeats 126.5 s after the cut (the bag's
read-first mark has lapsed), so the repeat sends unread, and Violet (a replayed or
cached answer) answers its POST 200 with that other system's refund; nothing of the
repeat applied. Here the platform dates refunds without a UTC offset (server-local
time, ``naive_dates``) or not at all (``null_dates``), with Violet's ``Date`` header
right or missing. ``AnswerCheck._misdated`` returns "" for a refund whose date has no
offset or is missing (``date_span`` is None), so neither ``not_before`` nor the
``Date`` age check ran: the other system's refund was returned as the repeat's own (a
refund this ask never made, reported applied). A date with the day only
(``...T00:00:00Z``) was returned likewise: its day reaches past the call's start.
(Failed on main cb72e88.)

Now a client remembers, for as long as it lives (10,000 bags, the least recently cut
dropped first), every bag where a call of its was cut (or ended) with nothing applied
after such a wait (``PendingAsks.was_cut``). No time bounds a replayed answer, and a
date that places nothing cannot age it, so the memory is not timed as the mark is. On
such a bag, a 2xx to a send made without a baseline that names a refund whose date
places nothing is read back (``Settings.cut_on_bag``, in ``_protocol.step``), never
returned and never sent again (it applied). The read-back cannot place that refund
either: the repeat ends pending for review, the truth it can tell. A genuine 2xx there
ends for review too (the price, on these bags and these dates only); anywhere else an
undated 2xx is returned with no request more.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy, VioletClient
from violet_async._reconcile import CUT_BOUND, PendingAsks
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, Hostile, Step, serve
from .test_review27_findings import NoDate
from .test_review35_findings import replayed_after_cut

AMOUNT = 300
OTHER_BAG = BAG_ID + 1

CASES: dict[str, dict[str, Any]] = {
    "naive-dates-with-date": {"naive_dates": True},
    "naive-dates-no-date": {"naive_dates": True, "no_date": True},
    "null-dates-with-date": {"null_dates": True},
    "null-dates-no-date": {"null_dates": True, "no_date": True},
}


def _for_review(got: OrderRefund | AmbiguousOutcomeError) -> AmbiguousOutcomeError:
    """``got``, which must be a review: pending, its 2xx proving it applied."""
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.answered, "a 2xx proves the send applied: never sent again"
    return got


@pytest.mark.parametrize("case", list(CASES))
async def test_a_replayed_2xx_naming_an_undated_refund_of_the_cut_wait_is_not_returned(
    case: str,
) -> None:
    got, other = await replayed_after_cut(126.5, dict(CASES[case]))
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
    # The read-back cannot place the other refund after the repeat's send either.
    review = _for_review(got)
    assert "cannot place it after this request was sent" in str(review)


MORE: dict[str, tuple[float, dict[str, Any]]] = {
    # A date with the day only: its day reaches past the call's start (not_before).
    "day-dates-with-date": (126.5, {"day_dates": True}),
    "day-dates-no-date": (126.5, {"day_dates": True, "no_date": True}),
    # No time bounds a replayed answer: an hour after the cut, the same.
    "null-dates-an-hour-later": (3600.0, {"null_dates": True, "no_date": True}),
    "naive-dates-a-day-later": (86_400.0, {"naive_dates": True}),
}


@pytest.mark.parametrize("case", list(MORE))
async def test_a_replayed_2xx_naming_a_refund_of_the_cut_wait_by_the_day_or_much_later(
    case: str,
) -> None:
    later, options = MORE[case]
    got, other = await replayed_after_cut(later, dict(options))
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
    _for_review(got)


async def _after(
    options: dict[str, Any],
    *,
    cut: bool,
    replay: bool,
    later: float = 126.5,
    bag_id: int = BAG_ID,
    key: str | None = None,
) -> tuple[OrderRefund | AmbiguousOutcomeError, Hostile, int]:
    """A client that cut a call on ``BAG_ID`` in a 429's wait (another system refunding
    the same amount 0.3 s before the cut), or did not (``cut``), then ``later`` seconds
    on a call on ``bag_id`` whose POST Violet answers 200: with that other refund's
    record, nothing applied (``replay``), or with the refund it makes. What the call
    got, the server, and the reads it made."""
    clock = FakeClock()
    server = (NoDate if options.pop("no_date", False) else Hostile)(clock, **options)
    async with (
        serve(server) as url,
        VioletClient(
            APP_ID,
            SECRET,
            username="hostile-user",
            password="hostile-password-0123",
            base_url=url,
            clock=clock,
            retry=RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0),
            store=MemoryStore(),
        ) as client,
    ):
        if cut:
            server.script = [Step(429, commit_after=None, headers={"Retry-After": "20"})]
            call = asyncio.ensure_future(
                client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
            )
            clock.call_later(19.5, lambda: server.add_refund(AMOUNT))
            clock.call_later(19.8, call.cancel)
            with pytest.raises(asyncio.CancelledError):
                await call
        if replay:
            other = {k: v for k, v in server.refunds[0].items() if not k.startswith("_")}
            server.script = [Step(200, commit_after=None, answer=other)]
        else:
            answer = None if bag_id == BAG_ID else {"bag_id": bag_id}
            server.script = [Step(200, answer=answer)]
        clock.advance(later)
        reads = server.reads
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, bag_id, amount_refunded=AMOUNT, idempotency_key=key
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    return got, server, server.reads - reads


HAPPY: dict[str, dict[str, Any]] = {
    "naive-dates": {"naive_dates": True},
    "null-dates-no-date": {"null_dates": True, "no_date": True},
    "day-dates": {"day_dates": True},
}


@pytest.mark.parametrize("case", list(HAPPY))
async def test_with_no_cut_on_the_bag_an_undated_2xx_is_returned_with_no_request_more(
    case: str,
) -> None:
    """The happy path: no call of this client was cut on the bag (none at all, or one
    on another bag). The 2xx naming a refund whose date places nothing is returned as
    it came: one POST, no read."""
    got, server, reads = await _after(dict(HAPPY[case]), cut=False, replay=False)
    assert isinstance(got, OrderRefund), got
    assert got.id in server.ours
    assert (server.posts, reads) == (1, 0)
    got, server, reads = await _after(dict(HAPPY[case]), cut=True, replay=False, bag_id=OTHER_BAG)
    assert isinstance(got, OrderRefund), got
    assert got.bag_id == OTHER_BAG
    assert (server.posts, reads) == (2, 0)


async def test_a_keyed_repeat_on_the_cut_bag_reads_a_replayed_undated_2xx_back() -> None:
    """The same story, the repeat made with an idempotency key (its asks go through the
    protocol's driver, with a record, never the inline first send): read back, pending
    for review, never returned nor sent again."""
    got, server, reads = await _after(
        {"null_dates": True, "no_date": True}, cut=True, replay=True, key="rma-review36"
    )
    assert not isinstance(got, OrderRefund), got
    _for_review(got)
    assert (server.posts, len(server.ours), reads) == (2, 0, 1)


@pytest.mark.parametrize("case", ["naive-dates", "null-dates-no-date"])
async def test_a_genuine_undated_2xx_on_the_cut_bag_ends_for_review_never_twice(
    case: str,
) -> None:
    """The price, on a bag where this client cut a call, with dates that place nothing:
    the repeat's own 2xx cannot be told from a replayed one (the bag lists the other
    system's refund and the repeat's, neither placed by its date), so it ends pending for
    review after one read, its refund made once and never sent again."""
    got, server, reads = await _after(dict(HAPPY[case]), cut=True, replay=False)
    _for_review(got)
    assert (server.posts, len(server.ours), reads) == (2, 1, 1)


async def test_a_genuine_dated_2xx_on_the_cut_bag_is_returned_with_no_request_more() -> None:
    """With dates that carry an offset, a bag where this client cut a call costs
    nothing after the mark lapsed: the repeat's own 2xx is returned, no read."""
    got, server, reads = await _after({}, cut=True, replay=False)
    assert isinstance(got, OrderRefund), got
    assert got.id in server.ours
    assert (server.posts, reads) == (2, 0)


async def test_within_the_marks_life_a_genuine_undated_2xx_on_the_cut_bag_is_returned() -> None:
    """Within the mark's life the repeat reads the bag first: its 2xx names a refund
    its baseline did not list, and is returned (the baseline tells it from the other
    system's refund, which the baseline lists), after that one read."""
    got, server, reads = await _after({"null_dates": True}, cut=True, replay=False, later=100.0)
    assert isinstance(got, OrderRefund), got
    assert got.id in server.ours
    assert (server.posts, reads) == (2, 1)


def test_the_memory_of_cut_bags_outlives_the_mark_and_is_bounded() -> None:
    """Kept past the mark's life, however long; the least recently cut bag goes first
    past ``CUT_BOUND``, and a bag cut again is the most recent; a client with only
    these left is empty (its calls keep the fast path on every other bag)."""
    asks = PendingAsks()
    asks.cut_while_absent(1, 0.0, 1_750_000_000.0, 126.0)
    assert asks.was_cut(1)
    assert not asks.read_first(1, 1e9, 1_750_000_000.0 + 1e9)
    assert asks.was_cut(1)
    assert not asks
    for bag in range(2, CUT_BOUND + 1):
        asks.cut_while_absent(bag, 0.0, 1_750_000_000.0, 126.0)
    asks.cut_while_absent(1, 0.0, 1_750_000_000.0, 126.0)
    asks.cut_while_absent(CUT_BOUND + 1, 0.0, 1_750_000_000.0, 126.0)
    assert asks.was_cut(1)
    assert not asks.was_cut(2)
    assert asks.was_cut(CUT_BOUND + 1)
