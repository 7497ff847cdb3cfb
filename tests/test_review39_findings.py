"""Review 39: findings against a hostile server scripted here (aiohttp.web on
127.0.0.1, port 0), through the public API, on an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from violet_async import AmbiguousOutcomeError, RetryPolicy
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client

AMOUNT = 300


class LocalDayInUtc(Hostile):
    """A platform that stores the day only, at midnight in its own zone, and Violet
    writes that moment in UTC, in one of its documented shapes (``+0000``): the local
    midnight of 2026-12-07 in +09:00 reads ``2026-12-06T15:00:00+0000``."""

    hours: float = 0.0
    shape: str = "+0000"

    def _date(self, when: float | None) -> str | None:
        if when is None:
            return None
        midnight = datetime.fromtimestamp(when, timezone(timedelta(hours=self.hours))).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        utc = midnight.astimezone(timezone.utc)
        if self.shape == "Z":
            return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.shape == ".000Z":
            return utc.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return utc.strftime("%Y-%m-%dT%H:%M:%S+0000")


#: (the zone's offset in hours, the UTC time of the call): the zone's midnight, written
#: in UTC, is more than the 14 h a wrong offset can explain before the send.
LOCAL_DAY_UTC: dict[str, tuple[float, tuple[int, int]]] = {
    "plus-0900-at-1048utc": (9.0, (10, 48)),
    "plus-0530-at-1048utc": (5.5, (10, 48)),
    "plus-0545-at-1048utc": (5.75, (10, 48)),
    "minus-0500-at-0300utc": (-5.0, (3, 0)),
}


@pytest.mark.parametrize("shape", ["+0000", "Z", ".000Z"])
@pytest.mark.parametrize("case", list(LOCAL_DAY_UTC))
async def test_a_local_day_written_in_utc_is_never_proven_absent(case: str, shape: str) -> None:
    """A refund dated with the day only, at midnight in the platform's zone but
    written in UTC (Violet's own shapes are all UTC), reads as a precise moment hours
    before the send: the ask's own refund, applied behind a 500 and listed at once,
    must never be proven absent and sent again."""
    hours, (hour, minute) = LOCAL_DAY_UTC[case]
    wall = datetime(2026, 12, 7, hour, minute, tzinfo=timezone.utc).timestamp()
    clock = FakeClock(wall_start=wall)
    server = LocalDayInUtc(clock, script=[Step(500, body=VIOLET_500, commit_after=0.0)])
    server.hours = hours
    server.shape = shape
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0)
    async with hostile_client(server, retry=retry) as client:
        try:
            got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        except AmbiguousOutcomeError as error:
            got = error
    assert len(server.ours) == 1, f"refunded {len(server.ours)} times ({got!r})"
    assert server.posts == 1
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review


@pytest.mark.parametrize("status", [200, 504])
@pytest.mark.parametrize("case", list(LOCAL_DAY_UTC))
async def test_a_local_day_written_in_utc_other_answers(case: str, status: int) -> None:
    """The same dates behind a 2xx (its date reads as made before the call began: read
    back) and a gateway's 504: never sent again."""
    hours, (hour, minute) = LOCAL_DAY_UTC[case]
    wall = datetime(2026, 12, 7, hour, minute, tzinfo=timezone.utc).timestamp()
    clock = FakeClock(wall_start=wall)
    server = LocalDayInUtc(clock, script=[Step(status, commit_after=0.0)])
    server.hours = hours
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0)
    async with hostile_client(server, retry=retry) as client:
        try:
            got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        except AmbiguousOutcomeError as error:
            got = error
    assert len(server.ours) == 1, f"refunded {len(server.ours)} times ({got!r})"
    assert server.posts == 1
