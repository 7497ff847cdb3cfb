"""A refund answered 200 without its id is handed to its caller; the next call on the
bag in the same process fails ambiguously and ends pending before the bag's list shows
anything. Its record, resumed in another process (which never saw the first refund
handed out), must not take the first call's refund for its own: the record carries
what the id-less refund looked like (amount, date), and a listed refund that may be it
is another call's (review, never a claim and never proof of absence).

Found by the simulator (seeds 802,844 and 1,815): the resume claimed the other call's
refund, a false success for a refund never made. Scripted server; refunds counted by
the server's own record."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    PendingRefund,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
)
from violet_async._transport import Timeouts
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER, BAG = 11, 22


class Idless:
    """The first POST applies and answers 200 without the refund's id or date; the
    second answers 502 and applies nothing. The list hides every refund until
    ``hide`` is cleared, then shows each dated ``late`` seconds after its answer (the
    platform stamps it when it has processed it)."""

    def __init__(self, clock: FakeClock, late: float) -> None:
        self.clock = clock
        self.late = late
        self.hide = True
        self.posts = 0
        self.made: list[dict[str, object]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _headers(self) -> dict[str, str]:
        return {"Date": formatdate(self.clock.time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "idless-token-0123456789", "refresh_token": "idless-refresh-0123"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        shown = [] if self.hide else self.made
        return web.Response(
            body=orjson.dumps(shown), content_type="application/json", headers=self._headers()
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        if self.posts > 1:
            return web.Response(
                status=502, text="<html>502 Bad Gateway</html>", headers=self._headers()
            )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.time() + self.late))
        made = refund_body(
            id=9_301,
            order_id=ORDER,
            bag_id=BAG,
            amount=body["amount_refunded"],
            status="COMPLETED",
            skus=[],
            date_created=stamp,
            date_last_modified=stamp,
        )
        self.made.append(made)
        answer = {k: v for k, v in made.items() if k not in ("id", "date_created")}
        return web.json_response(answer, headers=self._headers())


@contextlib.asynccontextmanager
async def _serve(server: Idless) -> AsyncIterator[str]:
    async with serve(server.app()) as base:
        yield base + "/v1"


def _client(url: str, clock: FakeClock, deadline: float) -> VioletClient:
    return VioletClient(
        4242,
        "idless-app-secret-0123456789abcdef",
        username="idless-user",
        password="idless-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=1),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


@pytest.mark.parametrize("late", [0.0, 2.0])
async def test_a_resume_elsewhere_never_claims_a_refund_another_call_got_without_its_id(
    late: float,
) -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Idless(clock, late)
    async with _serve(server) as url, _client(url, clock, 3.0) as one:
        first = await one.refund_bag(ORDER, BAG, amount_refunded=500)
        assert first.id is None
        with pytest.raises(AmbiguousOutcomeError) as info:
            await one.refund_bag(ORDER, BAG, amount_refunded=500)
        pending = info.value.pending
        assert pending is not None
        assert pending.unnamed == ((500, None),)
        # The record travels as JSON to another process (a job queue).
        carried = PendingRefund.from_json(pending.to_json())
        assert carried.unnamed == pending.unnamed
    server.hide = False
    clock.advance(600.0)
    async with _serve(server) as url2, _client(url2, clock, 600.0) as two:
        with pytest.raises(AmbiguousOutcomeError) as again:
            await two.resume(carried)
        assert again.value.pending is not None
        assert again.value.pending.needs_review
        assert "handed to other calls" in str(again.value)
    assert server.posts == 2
    assert len(server.made) == 1


def test_a_record_with_a_malformed_unnamed_list_is_refused_naming_the_field() -> None:
    record = PendingRefund("refund", ORDER, BAG, RefundBagRequest(amount_refunded=500)).to_dict()
    for bad in ([[500]], [["500", None]], [[500, "later"]], [[True, None]], {"a": 1}):
        record["unnamed"] = bad
        with pytest.raises(RequestValidationError, match=r"pending\.unnamed"):
            PendingRefund.from_dict(record)
    record["unnamed"] = [[500, 1_700_000_000], [None, None]]
    assert PendingRefund.from_dict(record).unnamed == ((500, 1_700_000_000.0), (None, None))
