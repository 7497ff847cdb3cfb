"""Review 17's findings, each against a server scripted here (refunds counted by the
server's own record)."""

from __future__ import annotations

import email.utils
import time

import orjson
from aiohttp import web

from violet_async import OrderRefund, RetryPolicy, VioletClient, VioletError
from violet_async._transport import Timeouts
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER, BAG = 71, 81
WALL0 = 1_790_000_000.0


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class SteppedLogin:
    """Violet for one bag, on a clock of its own (true time: it never steps). Its
    login takes 60 s, during which this machine's wall clock steps by ``step``
    seconds. Each POST applies and is answered by a gateway's 524."""

    def __init__(self, clock: FakeClock, step: float) -> None:
        self.clock = clock
        self.step = step
        self.mono0 = clock.monotonic()
        self.made: list[dict[str, object]] = []
        self.posts = 0

    def violet_time(self) -> float:
        return WALL0 + (self.clock.monotonic() - self.mono0)

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._date)
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = email.utils.formatdate(self.violet_time(), usegmt=True)

    async def _login(self, request: web.Request) -> web.Response:
        self.clock.advance(30.0)
        self.clock.step_wall(self.step)
        self.clock.advance(30.0)
        return web.json_response({"token": "step-token-0123456789", "refresh_token": "r-01"})

    async def _list(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.made), content_type="application/json")

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        now = _stamp(self.violet_time())
        self.made.append(
            refund_body(
                id=9_000 + len(self.made),
                order_id=ORDER,
                bag_id=BAG,
                amount=body["amount_refunded"],
                status="COMPLETED",
                skus=[],
                errors=[],
                date_created=now,
                date_last_modified=now,
            )
        )
        return web.Response(status=524, text="<html>Error 524: A timeout occurred</html>")


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        4242,
        "review17-app-secret-0123456789abcdef",
        username="review17-user",
        password="review17-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=600.0, max_attempts=4),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def _run(step: float) -> tuple[SteppedLogin, OrderRefund | VioletError]:
    clock = FakeClock(wall_start=WALL0)
    violet = SteppedLogin(clock, step)
    async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
        try:
            outcome: OrderRefund | VioletError = await client.refund_bag(
                ORDER, BAG, amount_refunded=500, idempotency_key="review17-step"
            )
        except VioletError as exc:
            outcome = exc
    return violet, outcome


async def test_a_wall_clock_step_during_a_keyed_sends_login_finds_its_own_refund() -> None:
    """Finding 1 (drive.stamp): a keyed send waits for its login; this machine's wall
    clock steps an hour forward during the login; the POST applies and is answered by
    a gateway's 524. ``stamp`` opened the refund-date window at the time read after
    the step, and the driver's WallWatch, which last looked before the login, then
    moved the record's times by the step once more: the window started an hour after
    the send left, and the call's own refund was left for review ("its date cannot
    place it") instead of handed back (no second refund: the matching rule still saw
    a refund like it). Fixed: ``stamp`` settles a step first."""
    for step in (3600.0, 7200.0):
        violet, outcome = await _run(step)
        assert len(violet.made) == 1, (step, violet.posts)
        assert isinstance(outcome, OrderRefund), (step, outcome)


async def test_a_wall_clock_step_back_during_a_keyed_sends_login_finds_its_own_refund() -> None:
    """As above with a step back of an hour (held before the fix too)."""
    violet, outcome = await _run(-3600.0)
    assert len(violet.made) == 1
    assert isinstance(outcome, OrderRefund), outcome


async def test_no_step_keyed_send_after_login_finds_its_own_refund() -> None:
    """Control: no step, the 524 that applied is read back as the call's own."""
    violet, outcome = await _run(0.0)
    assert len(violet.made) == 1
    assert isinstance(outcome, OrderRefund), outcome
