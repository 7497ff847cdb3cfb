"""Review 38: attacks on the seams of the newest fixes, each on a server scripted here
(tests/hostile.py, on 127.0.0.1 port 0) with a FakeClock shared with the client."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    OrderRefund,
    RetryPolicy,
    VioletClient,
)
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import (
    APP_ID,
    BAG_ID,
    ORDER_ID,
    SECRET,
    VIOLET_500,
    Hostile,
    Step,
    hostile_client,
    serve,
)
from .test_review27_findings import NoDate

AMOUNT = 300
KEY = "rma-review38"


class Held:
    """``Hostile.on_answer`` that holds a POST's answer until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        await self.release.wait()


async def _late_replay_on_cut_bag(
    options: dict[str, Any], *, key: str | None, cut: bool = True, replay: bool = True
) -> tuple[OrderRefund | AmbiguousOutcomeError, Hostile, int]:
    """A call cut in a 429's wait (another system refunding the same amount 0.3 s
    before the cut); 126.5 s later (the read-first mark lapsed) a repeat whose POST
    Violet answers 200 with that other refund's record (nothing applied), the answer
    held until the caller cancelled the repeat (``keep_cancelled_sends``); then the
    repeat of that (its key, or a resume of its record). What it got, the server and
    the other refund's id. ``cut``: the first call was cut (else: none was made);
    ``replay``: the repeat's 200 names the other refund, nothing applied (else: the
    refund it made)."""
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
            keep_cancelled_sends=True,
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
            assert client._shared.unsettled.was_cut(BAG_ID)
        else:
            clock.advance(19.5)
            server.add_refund(AMOUNT)
        other = {k: v for k, v in server.refunds[0].items() if not k.startswith("_")}
        clock.advance(126.5)
        held = Held()
        server.script = [Step(200, commit_after=None, answer=other) if replay else Step(200)]
        server.on_answer = held
        server.post_arrived = asyncio.Event()
        repeat = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key)
        )
        await asyncio.wait_for(server.post_arrived.wait(), 5.0)
        repeat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(repeat, 5.0)
        server.on_answer = None
        held.release.set()
        late = tuple(getattr(client._shared, "late_answers", ()))
        if late:
            await asyncio.wait_for(asyncio.gather(*late), 5.0)
        clock.advance(2.0)
        try:
            if key is not None:
                got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key
                )
            else:
                with pytest.raises(BagPendingError) as caught:
                    await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
                got = await client.resume(caught.value.pending[0])
        except AmbiguousOutcomeError as exc:
            got = exc
    return got, server, other["id"]


LATE: dict[str, dict[str, Any]] = {
    "null-dates": {"null_dates": True},
    "naive-dates": {"naive_dates": True},
    "null-dates-no-date": {"null_dates": True, "no_date": True},
    "day-dates": {"day_dates": True},
}


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "resume"])
@pytest.mark.parametrize("case", list(LATE))
async def test_a_late_replayed_undated_2xx_on_a_cut_bag_is_not_returned(
    case: str, keyed: bool
) -> None:
    got, server, other = await _late_replay_on_cut_bag(dict(LATE[case]), key=KEY if keyed else None)
    assert server.ours == []
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
    # Nothing it can place: pending for review, never sent again.
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert server.posts == 2


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "resume"])
@pytest.mark.parametrize("case", ["null-dates", "naive-dates"])
async def test_a_late_genuine_undated_2xx_on_a_bag_never_cut_is_returned_with_no_request(
    case: str, keyed: bool
) -> None:
    """The happy path the fix keeps: no call was cut on the bag, and the cancelled
    repeat's own 200 (a date that places nothing) lands late: its next resume returns
    that refund, no request more."""
    got, server, _ = await _late_replay_on_cut_bag(
        dict(LATE[case]), key=KEY if keyed else None, cut=False, replay=False
    )
    assert isinstance(got, OrderRefund), got
    assert server.ours == [got.id]
    assert server.posts == 1


async def test_a_late_genuine_dated_2xx_on_a_cut_bag_is_returned_with_no_request() -> None:
    """Dates with an offset place the refund: on a cut bag the cancelled repeat's own
    late 200 is still returned by its next resume, no request more."""
    got, server, _ = await _late_replay_on_cut_bag({}, key=KEY, replay=False)
    assert isinstance(got, OrderRefund), got
    assert server.ours == [got.id]
    assert server.posts == 2


class LocalDayDates(Hostile):
    """A platform that stores the day only, and writes it as midnight in its own zone
    with that zone's offset (``2026-12-07T00:00:00+09:00``), not in UTC."""

    hours: float = 0.0

    def _date(self, when: float | None) -> str | None:
        if when is None:
            return None
        return (
            datetime.fromtimestamp(when, timezone(timedelta(hours=self.hours)))
            .replace(hour=0, minute=0, second=0, microsecond=0)
            .isoformat()
        )


#: (the zone's offset in hours, the UTC time of the call): local midnight is more than
#: the 14 h a wrong offset can explain before the send.
LOCAL_DAY: dict[str, tuple[float, tuple[int, int]]] = {
    "plus-0530-at-1048utc": (5.5, (10, 48)),
    "plus-0900-at-1048utc": (9.0, (10, 48)),
    "minus-0500-at-0300utc": (-5.0, (3, 0)),
}


@pytest.mark.parametrize("status", [500, 504])
@pytest.mark.parametrize("case", list(LOCAL_DAY))
async def test_a_day_only_date_in_a_local_zone_is_never_proven_absent(
    case: str, status: int
) -> None:
    """Review 38: a refund dated with the day only, written as midnight in the
    platform's zone with its offset, was placed at that midnight (only a UTC midnight
    was taken for a day), hours before the send: the ask's own refund, applied behind a
    500 and listed at once, was skipped as older than the send, proven absent after the
    settle window and sent again: two refunds. A day-only date places nothing: the
    call ends pending for review, its refund among the candidates, never sent again."""
    hours, (hour, minute) = LOCAL_DAY[case]
    wall = datetime(2026, 12, 7, hour, minute, tzinfo=timezone.utc).timestamp()
    clock = FakeClock(wall_start=wall)
    server = LocalDayDates(clock, script=[Step(status, body=VIOLET_500, commit_after=0.0)])
    server.hours = hours
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0)
    async with hostile_client(server, retry=retry) as client:
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert len(server.ours) == 1, f"refunded {len(server.ours)} times"
    assert server.posts == 1
    assert caught.value.pending is not None
    assert caught.value.pending.needs_review


def _policy(skew: float) -> RetryPolicy:
    return RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, clock_skew=skew)


async def _cut_then_clone_repeats(
    cut_skew: float, repeat_skew: float, later: float, *, replay: bool = True
) -> tuple[OrderRefund | AmbiguousOutcomeError, Hostile, int, int]:
    """A client (``clock_skew=cut_skew``) cuts a call in a 429's wait (another system
    refunding the same amount 0.3 s before the cut, dated with an offset, Violet's
    ``Date`` right); ``later`` seconds on, a clone of it (``with_options``, sharing its
    pending asks and marks) with ``clock_skew=repeat_skew`` repeats the call, and
    Violet answers its POST 200 with that other refund's record, nothing applied
    (``replay``; else with the refund it makes). What the repeat got, the server, the
    other refund's id and the repeat's reads."""
    clock = FakeClock()
    server = Hostile(clock)
    async with (
        serve(server) as url,
        VioletClient(
            APP_ID,
            SECRET,
            username="hostile-user",
            password="hostile-password-0123",
            base_url=url,
            clock=clock,
            retry=_policy(cut_skew),
            store=MemoryStore(),
        ) as client,
    ):
        clone = client.with_options(retry=_policy(repeat_skew))
        server.script = [Step(429, commit_after=None, headers={"Retry-After": "20"})]
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        clock.call_later(19.5, lambda: server.add_refund(AMOUNT))
        clock.call_later(19.8, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        other = {k: v for k, v in server.refunds[0].items() if not k.startswith("_")}
        clock.advance(later)
        server.script = [Step(200, commit_after=None, answer=other) if replay else Step(200)]
        reads = server.reads
        try:
            got: OrderRefund | AmbiguousOutcomeError = await clone.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    return got, server, other["id"], server.reads - reads


@pytest.mark.parametrize("later", [126.5, 300.0, 600.0])
async def test_a_clone_allowing_more_clock_skew_reads_first_after_the_cutters_mark(
    later: float,
) -> None:
    """Review 38: the read-first mark of a bag where a call was cut in a 429's wait
    lasted the cutting client's life (twice its clock skew and 6 s: 126 s), but a
    clone sharing its marks (``with_options``) with ``clock_skew=300`` judges a 2xx's
    age by its own skew (``not_before``: 305 s before the call began). Repeated through
    the clone 126.5 s after the cut, it sent unread, and a replayed 2xx naming another
    system's refund made 0.3 s before the cut (dated with an offset, 126.8 s before
    the call began) was returned as the repeat's own: a refund it never made. The
    clone now reads first for its own mark's life (2 x 300 + 6 s): the other refund is
    in its baseline, never its own."""
    got, server, other, reads = await _cut_then_clone_repeats(60.0, 300.0, later)
    assert server.ours == []
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
    assert isinstance(got, AmbiguousOutcomeError), got
    assert reads >= 1, "read first"


async def test_a_clone_reads_first_only_for_its_own_marks_life() -> None:
    """Past the clone's own mark life (606 s) it sends unread again (its not_before then
    ages a refund made before the cut out), and a genuine 2xx is returned."""
    got, server, _, reads = await _cut_then_clone_repeats(60.0, 300.0, 606.5, replay=False)
    assert isinstance(got, OrderRefund), got
    assert server.ours == [got.id]
    assert reads == 0
