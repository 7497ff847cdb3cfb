"""The read before a re-send after a 429 that fails on a later page: what the pages
that did answer listed was on the bag before the re-send, so it is never the ask's
(simulator seed 1235637). Shown on a server scripted in the test (tests/hostile.py:
one order with one bag on 127.0.0.1, port 0, on a FakeClock shared with the client)
and on the pure protocol."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
import orjson
from aiohttp import web

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy
from violet_async._protocol import Do, Observation, Phase, step
from violet_async.exceptions import ResponseFormatError
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client
from .test_resend_window import SETTINGS, T0, busy, refund, sent

AMOUNT = 300


@attrs.define
class BrokenSecondPage(Hostile):
    """Lists refunds newest first; while ``broken``, page 1 answers for another page
    (a list that cannot be followed: the whole read fails)."""

    broken: bool = False

    async def _list(self, request: web.Request) -> web.Response:
        self.refunds.sort(key=lambda r: -r["_at"])  # newest first
        response = await super()._list(request)
        if self.broken and request.query.get("page") == "1":
            assert isinstance(response.body, bytes)
            data: dict[str, Any] = orjson.loads(response.body)
            data["number"] = 7
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        return response


async def test_a_failed_read_before_a_re_send_keeps_what_its_pages_listed() -> None:
    """A POST is answered 429 (Retry-After 20 s); another system refunds the same
    amount 17 s later, during the wait. The read after the wait lists that refund on
    its first page and fails on its second (a page that answers for another). The
    re-send, 3 s after the other refund, is answered 500 (Violet's own: nothing
    applied). The re-send went out with no baseline, and its read-back took the other
    system's refund, dated inside the date tolerance of the re-send, for its own: the
    shopper was never refunded. What the pages that answered listed joins the
    baseline: the other refund is never the ask's, and the ask is sent again."""
    clock = FakeClock()
    server = BrokenSecondPage(clock, page_size=2)
    for amount in (50, 60, 70):  # older refunds, enough for a second page
        server.add_refund(amount, age=3600.0)
    server.script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    others: list[dict[str, Any]] = []

    def other_refund() -> None:
        others.append(server.add_refund(AMOUNT))
        server.broken = True  # until the re-send is answered

    async def heal() -> None:
        server.broken = False

    clock.call_later(17.0, other_refund)
    server.on_answer = heal
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert others, "the other system's refund was made"
    other = others[0]["id"]
    assert isinstance(got, OrderRefund), got
    assert got.id != other, "another system's refund was returned as this ask's own"
    assert got.id in server.ours
    assert server.posts == 3


@attrs.define
class ShortSecondPage(Hostile):
    """While ``broken``, page 1 counts a refund fewer than the list has (an older
    list: the whole read fails), and answers only once page 2, asked for ahead, has."""

    broken: bool = False
    second_page: asyncio.Event = attrs.Factory(asyncio.Event)

    async def _list(self, request: web.Request) -> web.Response:
        number = request.query.get("page", "0")
        if self.broken and number == "1":
            # Page 2, asked for at the same time, answers first; page 1's count then
            # has the walk ask for it again, a round trip after page 2 arrived.
            await self.second_page.wait()
        response = await super()._list(request)
        if number == "2":
            self.second_page.set()
        if self.broken and number == "1":
            assert isinstance(response.body, bytes)
            data: dict[str, Any] = orjson.loads(response.body)
            data["total_elements"] -= 1
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        return response


async def test_a_refund_on_a_page_read_ahead_of_the_page_that_failed_joins_the_baseline() -> None:
    """Seed 1235637's shape: the other system's refund is on page 2, read ahead, and
    page 1 fails the read (it counts fewer refunds than page 0: an older list). Page 2
    answered before the re-send: what it lists joins the baseline too."""
    clock = FakeClock()
    server = ShortSecondPage(clock, page_size=2)
    for amount in (50, 60, 70, 80):  # older refunds: two pages of them
        server.add_refund(amount, age=3600.0)
    server.script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    others: list[dict[str, Any]] = []

    def other_refund() -> None:
        others.append(server.add_refund(AMOUNT))  # listed last: page 2
        server.broken = True

    async def heal() -> None:
        server.broken = False

    clock.call_later(17.0, other_refund)
    server.on_answer = heal
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert others, "the other system's refund was made"
    assert isinstance(got, OrderRefund), got
    assert got.id != others[0]["id"], "another system's refund was returned as this ask's own"
    assert got.id in server.ours
    assert server.posts == 3


def _paging_error() -> ResponseFormatError:
    return ResponseFormatError("GET /p: asked for page 1, got 7", body=b"", status=200)


def test_the_pages_a_failed_read_before_a_re_send_listed_join_its_baseline() -> None:
    """On the protocol: the read before a re-send after a 429 fails, carrying what
    its pages that answered listed; those refunds join the baseline (a failed read
    listing nothing is read again, the record as it was: seed 5062095)."""
    ask, action = step(sent(), busy(), SETTINGS, T0, 500.0)
    assert (ask.phase, action.do) == (Phase.ABSENT, Do.READ)
    other = refund(9_999, T0 + 17.0)
    failed = Observation.read_failed(T0 + 20.0, _paging_error(), refunds=(other,))
    resent, action = step(ask, failed, SETTINGS, T0 + 20.0, 480.0)
    assert action.do is Do.SEND
    assert resent.baseline is not None
    assert 9_999 in resent.baseline
    bare, action = step(
        ask, Observation.read_failed(T0 + 20.0, _paging_error()), SETTINGS, T0 + 20.0, 480.0
    )
    assert action.do is Do.READ
    assert bare == ask
