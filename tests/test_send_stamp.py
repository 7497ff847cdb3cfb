"""A driven send that leaves later than its record was made (a login, a token
renewal in between): the window a refund's date must sit in for it to be this ask's
starts when the request leaves, not when the send was decided. Against a server
scripted here: while the client logs in (60 s), another system refunds the same
amount on the bag; our POST is then answered by a gateway's 524 without applying.
Reading the bag back must never hand that other refund to the caller as theirs (a
false success: the refund they asked for was never made). Refunds are counted by
the server's own record."""

from __future__ import annotations

import email.utils
import time

import orjson
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._transport import Timeouts
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER, BAG = 51, 61
LOGIN_TAKES = 60.0


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class SlowLogin:
    """Violet for one bag. Its login takes ``LOGIN_TAKES`` (virtual) seconds, and
    another system refunds 500 on the bag half-way through it. Each POST is answered
    524 and applies nothing (``applied`` False) or applies and answers 200."""

    def __init__(self, clock: FakeClock, *, applied: bool) -> None:
        self.clock = clock
        self.applied = applied
        self.made: list[dict[str, object]] = []
        self.ours: list[int] = []
        self.logins = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._date)
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _record(self, amount: object) -> dict[str, object]:
        now = _stamp(self.clock.time())
        listed = refund_body(
            id=8_000 + len(self.made),
            order_id=ORDER,
            bag_id=BAG,
            amount=amount,
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=now,
            date_last_modified=now,
        )
        self.made.append(listed)
        return listed

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        # Violet's clock is the client's (virtual) clock, to the second.
        response.headers["Date"] = email.utils.formatdate(self.clock.time(), usegmt=True)

    async def _login(self, request: web.Request) -> web.Response:
        self.logins += 1
        self.clock.advance(LOGIN_TAKES / 2)
        self._record(500)  # another system's refund, while the client logs in
        self.clock.advance(LOGIN_TAKES / 2)
        return web.json_response({"token": "stamp-token-0123456789", "refresh_token": "r-01"})

    async def _list(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.made), content_type="application/json")

    async def _refund(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self.applied:
            return web.Response(status=524, text="<html>Error 524: A timeout occurred</html>")
        listed = self._record(body["amount_refunded"])
        self.ours.append(int(str(listed["id"])))
        return web.json_response(listed)


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        4242,
        "stamp-app-secret-0123456789abcdef",
        username="stamp-user",
        password="stamp-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=300.0, max_attempts=1),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def test_a_refund_made_while_a_keyed_send_waits_for_its_login_is_not_its_own() -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    violet = SlowLogin(clock, applied=False)
    async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
        try:
            outcome: OrderRefund | VioletError = await client.refund_bag(
                ORDER, BAG, amount_refunded=500, idempotency_key="stamp-key-1"
            )
        except VioletError as exc:
            outcome = exc
    assert violet.logins == 1
    assert len(violet.made) == 1
    # Ours never applied: the other system's refund is never handed out as ours.
    assert not isinstance(outcome, OrderRefund), outcome
    assert not isinstance(outcome, AmbiguousOutcomeError) or outcome.pending is not None


async def test_a_keyed_send_that_waited_for_its_login_still_finds_its_own_refund() -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    violet = SlowLogin(clock, applied=True)
    async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
        refund = await client.refund_bag(
            ORDER, BAG, amount_refunded=500, idempotency_key="stamp-key-2"
        )
    assert [refund.id] == violet.ours


class SlowRenewal(SlowLogin):
    """The first POST is refused as an expired token (nothing applied); the login that
    renews it takes ``LOGIN_TAKES`` seconds, during which another system refunds 500;
    the second POST is answered 524 and applies nothing."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, applied=False)
        self.posts = 0

    async def _login(self, request: web.Request) -> web.Response:
        self.logins += 1
        if self.logins > 1:
            return await super()._login(request)
        return web.json_response({"token": "stamp-token-first-01"})

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.posts == 1:
            return web.json_response({"message": "Token has expired", "error_code": 11}, status=401)
        return await super()._refund(request)


async def test_a_refund_made_while_an_expired_token_is_renewed_is_not_the_resends() -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    violet = SlowRenewal(clock)
    async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
        try:
            outcome: OrderRefund | VioletError = await client.refund_bag(
                ORDER, BAG, amount_refunded=500
            )
        except VioletError as exc:
            outcome = exc
    assert violet.posts == 2
    assert len(violet.made) == 1
    assert not isinstance(outcome, OrderRefund), outcome
