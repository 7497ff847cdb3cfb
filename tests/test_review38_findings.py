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
