"""Review 27: an adversarial review of the read before a re-send after a 429
(``_protocol.start`` / ``step``, ``_reconcile.drive``) and of review 25's fixes, each
shown on a server scripted in its test (tests/hostile.py: one order with one bag on
127.0.0.1, port 0, on a FakeClock shared with the client) or on the pure protocol."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PermissionDeniedError,
    RetryPolicy,
    VioletClient,
)
from violet_async._protocol import Do, Observation, Phase, start, step
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, VIOLET_500, Hostile, Step, serve
from .test_resend_window import SETTINGS, T0, busy, lost, refund, sent

AMOUNT = 300
KEY = "rma-review27-429-wait"
RETRY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0)


@attrs.define
class NoDate(Hostile):
    """Answers whose ``Date`` cannot be read: no reading of Violet's clock, so this
    machine's clock (within ``clock_skew``) is all a refund's date is judged by."""

    @web.middleware
    async def _date_header(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = "no date here"
        return response


def _client(url: str, clock: FakeClock, store: MemoryStore) -> VioletClient:
    return VioletClient(
        APP_ID,
        SECRET,
        username="hostile-user",
        password="hostile-password-0123",
        base_url=url,
        clock=clock,
        retry=RETRY,
        store=store,
    )


def test_a_record_left_waiting_out_a_429_reads_the_bag_before_its_re_send() -> None:
    """A call that waited out a 429 in place reads the bag right before the re-send;
    a record it left in that wait (its caller cancelled, its process died, its key
    taken over) was resumed with the re-send at once. Another system's refund of the
    same amount made during the wait, no ``Date`` to date it by (this machine's clock
    within ``clock_skew``), the re-send answered 500: the read after the window took
    that refund for the ask's own. Resumed, it is read first like the call itself."""
    other = refund(9_999, T0 + 10.0)
    waiting, action = step(sent(), busy(), SETTINGS, T0, 500.0)
    assert waiting.phase is Phase.ABSENT
    ask, action = start(waiting, SETTINGS, T0 + 20.0, attempt_timeout=5.0)
    assert action.do is Do.READ
    assert not action.read_bag
    assert ask.phase is Phase.ABSENT
    ask, action = step(ask, Observation.read(T0 + 20.0, [other]), SETTINGS, T0 + 20.0, 480.0)
    assert action.do is Do.SEND
    assert ask.baseline is not None
    assert 9_999 in ask.baseline
    assert ask.first_sent_at == ask.last_sent_at == T0 + 20.0
    ask, action = step(ask, lost(T0 + 20.0), SETTINGS, T0 + 21.0, 480.0)
    after = T0 + 100.0
    ask, action = step(ask, Observation.read(after, [other]), SETTINGS, after, 400.0)
    assert action.do is Do.SEND, ask.note  # proven absent: never the other's refund


async def test_a_keyed_repeat_after_a_cancel_in_a_429_wait_never_takes_anothers_refund() -> None:
    """A keyed call's POST is answered 429 (Retry-After 20 s); another system refunds
    the same amount 3 s later; the caller cancels at 5 s (the key's record: ABSENT).
    The repeat sent at once, was answered 500 (Violet's own, nothing applied), and with
    no ``Date`` to date refunds by, its read-back returned the other system's refund as
    the call's own (the shopper never refunded, the call saying they were). The repeat
    reads the bag before its re-send now: the other refund is never its own."""
    clock = FakeClock()
    script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    server = NoDate(clock, script=script)
    store = MemoryStore()
    async with serve(server) as url:
        async with _client(url, clock, store) as first:
            call = asyncio.ensure_future(
                first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
            )
            clock.call_later(3.0, lambda: server.add_refund(AMOUNT))
            clock.call_later(5.0, call.cancel)
            with pytest.raises(asyncio.CancelledError):
                await call
        assert server.posts == 1
        other = server.refunds[0]["id"]
        clock.advance(1.0)
        async with _client(url, clock, store) as again:
            try:
                got: OrderRefund | AmbiguousOutcomeError = await again.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
                )
            except AmbiguousOutcomeError as exc:
                got = exc
    assert isinstance(got, OrderRefund), got
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]
    # The 429, the re-send answered 500 (read first), the send once that one was
    # proven absent after its window.
    assert server.posts == 3


#: A gateway's password, and a token written as the user name (``https://token@host``).
GATEWAY_PASSWORD = "Gw9Pass0wordTail"


@pytest.mark.parametrize(
    "userinfo",
    [f"gateway:{GATEWAY_PASSWORD}", GATEWAY_PASSWORD, f"{GATEWAY_PASSWORD}:"],
    ids=["user-password", "token-as-user", "token-empty-password"],
)
async def test_a_gateway_echoing_the_basic_credentials_of_the_base_url_shows_no_secret(
    userinfo: str,
) -> None:
    """The base URL's ``user:password@`` is sent as ``Authorization: Basic`` (the
    HTTP client builds it from the URL); a gateway's error page listing the request
    headers handed ``Basic <base64 of user:password>`` to the caller, a log line and
    an error tracker: the password (or a token written as the user name) decodes
    from it. Review 25 redacted the password as written and decoded, not as sent."""
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        seen.append(auth)
        message = f"gateway refused Authorization: {auth}"
        return web.json_response({"status": 403, "message": message}, status=403)

    app = web.Application()
    app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://{userinfo}@127.0.0.1:{port}/v1"
    try:
        async with VioletClient(
            11, "review27-app-secret-0123", token="review27-token-0123456789", base_url=url
        ) as client:
            with pytest.raises(PermissionDeniedError) as info:
                await client.list_bag_refunds(ORDER_ID, BAG_ID)
    finally:
        await runner.cleanup()
    assert seen
    assert seen[0].startswith("Basic ")  # the gateway did get its credentials
    sent = seen[0].removeprefix("Basic ")
    error = info.value
    for text in (str(error), repr(error), error.body.decode(), str(error.message)):
        assert sent not in text
        assert GATEWAY_PASSWORD not in text


async def test_a_page_echoing_a_proxys_credentials_shows_no_secret() -> None:
    """A plain-http request through an ``http://user:password@`` proxy carries
    ``Proxy-Authorization: Basic ...`` itself; a page quoting the request headers (or
    the credentials decoded) handed the proxy's password to the caller: the client's
    errors knew the base URL's credentials (review 25), not the proxy's."""
    password = "Px9Pass0wordTail"
    seen: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        auth = request.headers.get("Proxy-Authorization", "")
        seen.append(auth)
        decoded = base64.b64decode(auth.removeprefix("Basic ")).decode() if auth else ""
        message = f"refused Proxy-Authorization: {auth} ({decoded})"
        return web.json_response({"status": 403, "message": message}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            11,
            "review27-app-secret-0123",
            token="review27-token-0123456789",
            base_url="http://127.0.0.1:9/v1",  # reached only through the proxy
            proxy=f"http://px:{password}@127.0.0.1:{port}",
        ) as client:
            with pytest.raises(PermissionDeniedError) as info:
                await client.list_bag_refunds(ORDER_ID, BAG_ID)
    finally:
        await runner.cleanup()
    assert seen
    assert seen[0].startswith("Basic ")  # the proxy did get its credentials
    sent = seen[0].removeprefix("Basic ")
    error = info.value
    for text in (str(error), repr(error), error.body.decode(), str(error.message)):
        assert sent not in text
        assert password not in text


def test_the_guard_before_a_send_never_holds_on_another_orders_refund() -> None:
    """``hold_if_present`` (a key whose store may have lost its entry, a batch's
    ``--retry-failed``): the read before the send lists a refund carrying what was
    asked, but naming another order under this bag's id. The guard held the ask as
    "already present" (``RefundAlreadyPresentError``, a batch's PRESENT): the caller
    told the shopper's refund exists, on the strength of another order's record.
    Review 25 made such a record never this ask's; here it is for a person (parked
    for review), never "present", never sent over."""
    new = attrs.evolve(sent(), phase=Phase.NEW, sends=0, first_sent_at=None, last_sent_at=None)
    guard = attrs.evolve(SETTINGS, hold_if_present=True)
    theirs = attrs.evolve(refund(9_999, T0 - 600.0), order_id=2)
    ask, action = step(new, Observation.read(T0, [theirs]), guard, T0, 500.0)
    assert action.do is Do.PARK
    assert ask.needs_review
    ours = refund(9_998, T0 - 600.0)  # this order's: held, as before
    _, action = step(new, Observation.read(T0, [ours]), guard, T0, 500.0)
    assert action.do is Do.HOLD
