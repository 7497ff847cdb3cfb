"""Remaining risk (e): a ``Date`` header that runs behind the clock Violet dates refunds
by. Without a baseline, a refund is claimed only when its date places it after the
send by the ``Date`` headers AND by this machine's clock: a header minutes behind
(a CDN or load balancer stamping its own) can no longer lower the floor below the
send and pass another system's earlier refund for ours. Against a server scripted
here (``tests/hostile.py`` with a ``Date`` of our choosing per response), on a
FakeClock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, OrderRefund, PendingRefund, VioletClient
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client
from .test_never_twice import ROOMY

HOUR = 3600.0


@attrs.define
class DatedHostile(Hostile):
    """Hostile, with its ``Date`` header scripted: ``lags`` are the seconds each
    response's ``Date`` is off the clock that dates the refunds (taken in turn, the
    last one kept; empty: ``header_skew``), or ``raw``, a header nobody can read (no
    ``Date``, as the client sees it)."""

    lags: list[float] = attrs.Factory(list)
    raw: str | None = None
    answered: int = 0

    @web.middleware
    async def _date_header(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if self.raw is not None:
            response.headers["Date"] = self.raw
        else:
            lags = self.lags or [self.header_skew]
            lag = lags[min(self.answered, len(lags) - 1)]
            response.headers["Date"] = formatdate(self.server_now() + lag, usegmt=True)
        self.answered += 1
        return response


async def refund_or_pending(
    client: VioletClient, pending: PendingRefund | None = None
) -> tuple[OrderRefund | None, AmbiguousOutcomeError | None]:
    """The call's (or the resume's) refund, or the error it ended pending with."""
    try:
        if pending is None:
            return await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300), None
        return await client.resume(pending), None
    except AmbiguousOutcomeError as exc:
        return None, exc


def never_applied() -> list[Step]:
    return [Step(504, GATEWAY_504, commit_after=None)]


def applied_then_504(wall_step: float = 0.0) -> list[Step]:
    return [Step(504, GATEWAY_504, commit_after=0.0, wall_step=wall_step)]


# -- (e): the Date header behind the refund clock ------------------------------------------


@pytest.mark.parametrize(("lag", "before"), [(170.0, 100.0), (60.0, 30.0)])
async def test_a_date_header_behind_never_claims_another_systems_earlier_refund(
    lag: float, before: float
) -> None:
    """The Date header ``lag`` seconds behind Violet's refund dates; another system's
    identical refund made ``before`` seconds before our POST, which a gateway answers
    504 and which never applies. Never returned as this call's, by the call nor by a
    resume long after (when every read's Date is past the old refund): pending for
    review, the old refund named as the candidate, one POST."""
    clock = FakeClock()
    server = DatedHostile(clock, script=never_applied(), header_skew=-lag)
    other = server.add_refund(300, age=before)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
        assert refund is None
        assert error is not None
        assert error.pending is not None
        assert error.pending.needs_review
        assert [r.id for r in error.candidates] == [other["id"]]
        clock.advance(HOUR)
        refund, again = await refund_or_pending(client, error.pending)
    assert refund is None
    assert again is not None
    assert again.pending is not None
    assert again.pending.needs_review
    assert [r.id for r in again.candidates] == [other["id"]]
    assert server.posts == 1
    assert server.ours == []


async def test_a_date_header_behind_with_a_baseline_is_review_too() -> None:
    """The same with ``read_before_send`` and a baseline read from a replica that does
    does not list the other refund yet (dated 100 s before the send, 170 s Date lag):
    new since the baseline is not new since the send; review, one POST."""
    server = DatedHostile(
        FakeClock(), script=never_applied(), header_skew=-170.0, replica_behind=3.0
    )
    other = server.add_refund(300, age=100.0)
    policy = attrs.evolve(ROOMY, read_before_send=True)
    async with hostile_client(server, retry=policy) as client:
        refund, error = await refund_or_pending(client)
    assert refund is None
    assert error is not None
    assert error.pending is not None
    assert error.pending.needs_review
    assert [r.id for r in error.candidates] == [other["id"]]
    assert server.posts == 1


# -- the honest cases ------------------------------------------------------------------


async def test_violet_two_minutes_ahead_finds_our_refund() -> None:
    """Violet's clock (Date and refund dates alike) 2 minutes ahead of ours: both
    readings place our refund after the send; found, one POST."""
    server = DatedHostile(FakeClock(), script=applied_then_504(), server_skew=120.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, _ = await refund_or_pending(client)
    assert refund is not None
    assert refund.reconciled
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_violet_two_minutes_behind_leaves_our_refund_for_review() -> None:
    """Violet's whole clock 2 minutes behind ours: from here that cannot be told from
    a Date header 2 minutes behind the clock that dates refunds (the case above), so
    our own refund, dated before the send by this machine's clock, is not claimed: the
    call ends pending for review with it as the candidate, one POST; a resume later
    says the same and sends nothing. A person confirms it."""
    clock = FakeClock()
    server = DatedHostile(clock, script=applied_then_504(), server_skew=-120.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
        assert refund is None
        assert error is not None
        assert error.pending is not None
        assert error.pending.needs_review
        assert [r.id for r in error.candidates] == server.ours
        clock.advance(HOUR)
        refund, again = await refund_or_pending(client, error.pending)
    assert refund is None
    assert again is not None
    assert [r.id for r in again.candidates] == server.ours
    assert server.posts == 1


@pytest.mark.parametrize("lag", [-3.0, 0.0, 3.0])
async def test_clocks_seconds_apart_find_our_refund(lag: float) -> None:
    """A Date header a few seconds off (whole seconds, time in flight): within
    ``date_tolerance``, our refund is found."""
    server = DatedHostile(FakeClock(), script=applied_then_504(), server_skew=lag)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, _ = await refund_or_pending(client)
    assert refund is not None
    assert refund.id == server.ours[0]
    assert server.posts == 1


@pytest.mark.parametrize("step", [3 * HOUR, -15 * HOUR])
async def test_a_wall_clock_step_of_hours_during_the_post_finds_our_refund(step: float) -> None:
    """This machine's wall clock steps hours during the POST (NTP): the step is
    measured, the Date agrees with the clock as it was before it, and the clock after
    it is hours off (not a reading of Violet's): found, one POST."""
    server = DatedHostile(FakeClock(), script=applied_then_504(wall_step=step))
    async with hostile_client(server, retry=ROOMY) as client:
        refund, _ = await refund_or_pending(client)
    assert refund is not None
    assert refund.id == server.ours[0]
    assert server.posts == 1


@pytest.mark.parametrize("step", [90.0, -90.0])
async def test_a_wall_clock_step_of_minutes_during_the_post_is_review(step: float) -> None:
    """A step of 90 s during the POST: the clock before it and the clock after it are
    both readings of Violet's within minutes of the Date, and our refund is after the
    send by only one of them (a Date header 90 s behind, with the step putting a
    right clock wrong, looks the same). Review with our refund as the candidate,
    one POST."""
    server = DatedHostile(FakeClock(), script=applied_then_504(wall_step=step))
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
    if step > 0:  # the Date agrees with the clock before it, behind the one after
        assert refund is None
        assert error is not None
        assert error.pending is not None
        assert error.pending.needs_review
        assert [r.id for r in error.candidates] == server.ours
    else:  # the clock after the step is behind: our refund is after the send by both
        assert refund is not None
        assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_no_date_header_finds_our_refund() -> None:
    """No readable Date at all: this machine's clock alone, within ``clock_skew``."""
    server = DatedHostile(FakeClock(), script=applied_then_504(), raw="not a date")
    async with hostile_client(server, retry=ROOMY) as client:
        refund, _ = await refund_or_pending(client)
    assert refund is not None
    assert refund.id == server.ours[0]
    assert server.posts == 1


# -- date games against the fix --------------------------------------------------------


@pytest.mark.parametrize(
    "lags",
    [[0.0, -170.0], [-170.0, 0.0], [0.0, -170.0, 0.0], [-60.0, -60.0, 0.0], [0.0, 0.0, -60.0]],
    ids=["login-honest", "login-behind", "post-behind", "reads-honest", "reads-behind"],
)
async def test_date_headers_that_disagree_never_claim_an_earlier_refund(
    lags: list[float],
) -> None:
    """Date headers that disagree between responses (one from Violet, another from a
    load balancer behind it); another system's refund 30 s before the POST, which
    never applies: never claimed, one POST."""
    clock = FakeClock()
    server = DatedHostile(clock, script=never_applied(), lags=lags)
    other = server.add_refund(300, age=30.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
        assert refund is None
        assert error is not None
        assert error.pending is not None
        clock.advance(HOUR)
        refund, again = await refund_or_pending(client, error.pending)
    assert refund is None
    assert again is not None
    assert [r.id for r in again.candidates] == [other["id"]]
    assert server.posts == 1


@pytest.mark.parametrize("step", [60.0, 170.0, -170.0])
async def test_a_wall_step_with_a_date_behind_never_claims_an_earlier_refund(step: float) -> None:
    """A wall clock step during the POST while the Date header runs 170 s behind and
    another system's refund was made 100 s before the POST: never claimed."""
    clock = FakeClock()
    server = DatedHostile(
        clock,
        script=[Step(504, GATEWAY_504, commit_after=None, wall_step=step)],
        header_skew=-170.0,
    )
    server.add_refund(300, age=100.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
        assert refund is None
        assert error is not None
        assert error.pending is not None
        clock.advance(HOUR)
        refund, _ = await refund_or_pending(client, error.pending)
    assert refund is None
    assert server.posts == 1


async def test_day_precision_dates_with_a_date_behind_are_never_claimed() -> None:
    """Refund dates with the day only and a Date 170 s behind: another system's refund
    of the same day is never claimed."""
    server = DatedHostile(FakeClock(), script=never_applied(), header_skew=-170.0, day_dates=True)
    server.add_refund(300, age=100.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
    assert refund is None
    assert error is not None
    assert error.pending is not None
    assert error.pending.needs_review
    assert server.posts == 1


@pytest.mark.parametrize("style", ["epoch_ms", "epoch_s", "plus_one_hour"])
async def test_other_date_styles_with_a_date_behind_are_never_claimed(style: str) -> None:
    """Another system's refund 100 s before the POST, its date as epoch milliseconds,
    epoch seconds (records nobody can read: never claimed, absence never proven) or
    with a right ``+01:00`` offset, the Date 170 s behind: never claimed, by the call
    or by a resume an hour later; one POST."""
    clock = FakeClock()
    server = DatedHostile(clock, script=never_applied(), header_skew=-170.0)
    other = server.add_refund(300, age=100.0)
    made = server.server_now() - 100.0
    if style == "epoch_ms":
        other["date_created"] = int(made * 1000)
    elif style == "epoch_s":
        other["date_created"] = int(made)
    else:
        plus_one = timezone(timedelta(hours=1))
        other["date_created"] = datetime.fromtimestamp(made, plus_one).isoformat()
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
        assert refund is None
        assert error is not None
        assert error.pending is not None
        clock.advance(HOUR)
        refund, again = await refund_or_pending(client, error.pending)
    assert refund is None
    assert again is not None
    assert server.posts == 1


@pytest.mark.parametrize("step", [170.0, -170.0, 3 * HOUR])
async def test_a_wall_step_before_the_resume_never_claims_an_earlier_refund(step: float) -> None:
    """The call ends pending (the Date 170 s behind, another system's refund 100 s
    before the POST, ours never applied); this machine's wall clock then steps before
    the resume: never claimed, one POST."""
    clock = FakeClock()
    server = DatedHostile(clock, script=never_applied(), header_skew=-170.0)
    server.add_refund(300, age=100.0)
    async with hostile_client(server, retry=ROOMY) as client:
        refund, error = await refund_or_pending(client)
        assert refund is None
        assert error is not None
        assert error.pending is not None
        clock.advance(HOUR)
        clock.step_wall(step)
        refund, _ = await refund_or_pending(client, error.pending)
    assert refund is None
    assert server.posts == 1
