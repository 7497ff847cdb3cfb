"""A resume with no deadline, whose settle window only an unsure clock puts hours away
(simulator seeds 921612, 923160, 924704, 930149: a resume in another process read the
bag back for hours, holding it), against a server scripted here."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import orjson
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    PendingRefund,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase
from violet_async._transport import Timeouts
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER, BAG = 93, 930
WALL0 = 1_790_000_000.0
HOURS_15 = 15 * 3600.0


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class LaggingDate:
    """Violet for one bag, behind a load balancer whose ``Date`` is ``date_off``
    seconds off Violet's clock. Its list is empty for ``hidden_for`` reads, then shows
    the refund the earlier (resumed) send made."""

    def __init__(self, clock: FakeClock, date_off: float, hidden_for: int) -> None:
        self.clock = clock
        self.date_off = date_off
        self.hidden_for = hidden_for
        self.list_reads = 0
        self.posts = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _headers(self) -> dict[str, str]:
        return {"Date": formatdate(self.clock.time() + self.date_off, usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"token": "unsure-token-0123456789", "refresh_token": "r-01"},
            headers=self._headers(),
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        return web.Response(status=500, text="not expected", headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        self.list_reads += 1
        made = []
        if self.list_reads > self.hidden_for:
            when = _stamp(WALL0 - 5.0)
            made.append(
                refund_body(
                    id=9_301,
                    order_id=ORDER,
                    bag_id=BAG,
                    amount=500,
                    status="COMPLETED",
                    skus=[],
                    errors=[],
                    date_created=when,
                    date_last_modified=when,
                )
            )
        return web.Response(
            body=orjson.dumps(made), content_type="application/json", headers=self._headers()
        )


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        4242,
        "unsure-app-secret-0123456789abcdef",
        username="unsure-user",
        password="unsure-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=None, max_attempts=4),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


def _elsewhere(sent: float) -> PendingRefund:
    """A record another process left: sent at ``sent`` by its clock, which (its Date
    headers said) agreed with Violet's."""
    return PendingRefund(
        "refund",
        ORDER,
        BAG,
        RefundBagRequest(amount_refunded=500),
        Phase.SENT,
        sends=1,
        first_sent_at=sent,
        last_sent_at=sent,
        settle_until=sent + 60.0,
        server_offset=0.0,
        clock="another-host-clock",
        note="APIConnectionError: POST: server disconnected",
    )


async def _resume(violet: LaggingDate, clock: FakeClock) -> tuple[object, float]:
    async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
        start = clock.monotonic()
        try:
            outcome: object = await asyncio.wait_for(
                client.resume(_elsewhere(WALL0 - 10.0)), timeout=60.0
            )
        except AmbiguousOutcomeError as exc:
            outcome = exc
        return outcome, clock.monotonic() - start


async def test_a_resume_without_a_deadline_parks_a_window_an_unsure_clock_puts_hours_away() -> None:
    """The resume's Date is 15 h behind the offset the record learned elsewhere: one of
    the two readings is wrong, so the window ends at the later one, 15 h away. A call
    with no deadline parks it (pending, nothing sent) after its read, rather than
    reading back for 15 h holding the bag (before: thousands of reads, and the refund
    that showed meanwhile decided the ask)."""
    clock = FakeClock(wall_start=WALL0)
    violet = LaggingDate(clock, date_off=-HOURS_15, hidden_for=20)
    outcome, took = await _resume(violet, clock)
    assert isinstance(outcome, AmbiguousOutcomeError), outcome
    pending = outcome.pending
    assert pending is not None
    assert not pending.needs_review
    assert "settle window ends in" in pending.note
    assert "unsure clock" in pending.note
    assert pending.settle_until is not None
    assert pending.settle_until - clock.time() > 14 * 3600
    assert violet.list_reads == 1
    assert violet.posts == 0
    assert took < 60.0


async def test_a_resume_without_a_deadline_still_waits_out_a_window_of_its_own_length() -> None:
    """The same record, the resume's Date agreeing with it: the window ends in a
    minute, and the call reads until the refund shows (no park)."""
    clock = FakeClock(wall_start=WALL0)
    violet = LaggingDate(clock, date_off=0.0, hidden_for=3)
    outcome, _ = await _resume(violet, clock)
    assert not isinstance(outcome, BaseException), outcome
    assert getattr(outcome, "id", None) == 9_301
    assert violet.list_reads == 4
    assert violet.posts == 0
