"""A step of this machine's wall clock before a call (since the client was made, or
while the call waited for its bag), against a server scripted here that sends no
``Date`` header (so nothing places Violet's clock): the refund that applied behind a
timeout must never look "15 h before the send" and be proven absent (a definite
failure, then a second refund). Simulator seed 855859. Refunds are counted by the
server's own record."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._reconcile import CLOCK_STEP, SLEW, ClockOrigin
from violet_async._transport import Timeouts
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER, BAG = 31, 41
STEP = 15 * 3600.0


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class NoDate:
    """Violet for one bag, with no ``Date`` header on any answer. Its clock is the
    client's clock as it was before any step (``true``). Each POST takes the next step
    of ``script``: ``ok`` (applied, 200), ``timeout`` (applied, then a gateway's 524),
    ``held`` (waits for ``release``, then applied, 200)."""

    def __init__(self, clock: FakeClock, script: list[str]) -> None:
        self.clock = clock
        self.wall0 = clock.time()
        self.script = script
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.made: list[dict[str, object]] = []

    def true(self) -> float:
        return self.wall0 + (self.clock.monotonic() - self.clock.start)

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(_no_date)
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "origin-token-0123456789", "refresh_token": "r-01"})

    async def _list(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.made), content_type="application/json")

    async def _refund(self, request: web.Request) -> web.Response:
        body = await request.json()
        step = self.script.pop(0) if self.script else "ok"
        if step == "held":
            self.holding.set()
            await self.release.wait()
        listed = refund_body(
            id=7_000 + len(self.made),
            order_id=ORDER,
            bag_id=BAG,
            amount=body["amount_refunded"],
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=_stamp(self.true()),
            date_last_modified=_stamp(self.true()),
        )
        self.made.append(listed)
        if step == "timeout":
            return web.Response(
                status=524, text="<html><body>Error 524: A timeout occurred</body></html>"
            )
        return web.json_response(listed)


async def _no_date(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall("Date", None)


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        4242,
        "origin-app-secret-0123456789abcdef",
        username="origin-user",
        password="origin-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=300.0, max_attempts=3),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def _ended(call: asyncio.Task[OrderRefund]) -> OrderRefund | BaseException:
    try:
        return await call
    except VioletError as exc:
        return exc


def _true_outcome(outcome: OrderRefund | BaseException, made: list[dict[str, object]]) -> None:
    """The refund it made, or pending/review: never a failure of a refund that applied."""
    if isinstance(outcome, OrderRefund):
        assert outcome.id == made[-1]["id"]
    else:
        assert isinstance(outcome, AmbiguousOutcomeError), outcome


@pytest.mark.parametrize("step", [STEP, -STEP])
async def test_a_step_between_the_clients_start_and_the_call_never_proves_its_refund_absent(
    step: float,
) -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    server = NoDate(clock, ["timeout"])
    async with serve(server.app()) as base:
        async with _client(base + "/v1", clock) as client:
            clock.wall_start += step  # NTP, an operator: monotonic time does not move
            outcome = await _ended(
                asyncio.ensure_future(
                    client.refund_bag(ORDER, BAG, RefundBagRequest(amount_refunded=500))
                )
            )
    assert len(server.made) == 1, "refunded twice"
    _true_outcome(outcome, server.made)


async def test_a_step_while_the_call_waits_for_its_bag_never_proves_its_refund_absent() -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    server = NoDate(clock, ["held", "timeout"])
    async with serve(server.app()) as base:
        async with _client(base + "/v1", clock) as client:
            first = asyncio.ensure_future(
                client.refund_bag(ORDER, BAG, RefundBagRequest(amount_refunded=900))
            )
            await server.holding.wait()
            second = asyncio.ensure_future(
                client.refund_bag(ORDER, BAG, RefundBagRequest(amount_refunded=250))
            )
            await asyncio.sleep(0.01)  # the second waits for the bag the first holds
            clock.wall_start += STEP
            server.release.set()
            assert isinstance(await _ended(first), OrderRefund)
            outcome = await _ended(second)
    assert len(server.made) == 2, "the second call refunded twice"
    _true_outcome(outcome, server.made)


def test_the_origin_sees_a_step_but_not_a_slew() -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    origin = ClockOrigin(clock)
    day = 86_400.0
    clock.advance(day)
    wall, mono = clock.time(), clock.monotonic()
    # A day of NTP slewing at its limit is not a step; a little more than that is.
    assert origin.step_at(wall + SLEW * day + CLOCK_STEP - 0.1, mono) == 0.0
    assert origin.step_at(wall + SLEW * day + CLOCK_STEP + 0.1, mono) > 0
    assert origin.step_at(wall - STEP, mono) == -STEP
