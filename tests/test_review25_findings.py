"""Review 25: findings on the direct money paths (``refund_bag``, ``cancel_bag``, keys,
``resume``), each shown on a server scripted in its test (tests/hostile.py: one order
with one bag on 127.0.0.1, port 0, on a FakeClock shared with the client)."""

from __future__ import annotations

import asyncio
import base64
import math
from typing import Any

import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    PendingRefund,
    PermissionDeniedError,
    RefundWaitTimeoutError,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
)
from violet_async._batch_cli import _stop_reason
from violet_async.exceptions import api_error_from_response
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client, serve

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0)


async def test_a_listed_refund_of_another_order_is_never_claimed() -> None:
    """The POST is answered 504 and never applied; 2 s later a refund of the same
    amount, naming another order under this bag's id, is on the bag's list. A 2xx
    naming another order is refused as not this request's (``parse_refund``), but the
    read-back took the same record for the call's own: a refund it never made,
    returned as ``reconciled``. It is for a person now, never claimed, never a miss."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(status=504, body=GATEWAY_504, commit_after=None)])

    def other_order() -> None:
        record = server.add_refund(300)
        record["order_id"] = ORDER_ID + 1

    async with hostile_client(server, retry=ROOMY) as client:
        clock.call_later(2.0, other_order)
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert server.posts == 1
    assert info.value.pending.needs_review


#: A gateway's password as people write them: with '/' (read by a URL parser as the
#: host's port, and then quoted by its error), with a space, and plain.
GATEWAY_PASSWORD = "Gw9Pass0wordTail"
BAD_BASE_URLS = (
    f"https://gateway:{GATEWAY_PASSWORD[:6]}/{GATEWAY_PASSWORD[6:]}@api.violet.io/v1",
    f"https://gateway:{GATEWAY_PASSWORD[:6]} {GATEWAY_PASSWORD[6:]}@api.violet.io/v1",
    f"ftp://gateway:{GATEWAY_PASSWORD}@api.violet.io/v1",
)


def _shows_password(text: str) -> bool:
    return GATEWAY_PASSWORD[:6] in text or GATEWAY_PASSWORD[6:] in text


@pytest.mark.parametrize("url", BAD_BASE_URLS)
def test_a_base_url_that_is_refused_shows_no_password(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``VIOLET_BASE_URL`` with a gateway's ``user:password@``: a URL refused as
    configuration quoted itself (and the URL parser's words, which quote the password
    read as a port) in the error, on the terminal and in every CI log."""
    monkeypatch.setenv("VIOLET_APP_ID", "11")
    monkeypatch.setenv("VIOLET_APP_SECRET", "review25-app-secret-0123")
    monkeypatch.setenv("VIOLET_TOKEN", "review25-token-0123456789")
    monkeypatch.setenv("VIOLET_BASE_URL", url)
    with pytest.raises(RequestValidationError) as info:
        VioletClient.from_env()
    assert info.value.field == "base_url"
    assert not _shows_password(str(info.value))
    assert not _shows_password(repr(info.value))


async def test_a_client_on_a_base_url_with_credentials_shows_no_password() -> None:
    """A client made on ``https://user:password@gateway/v1`` printed the password in its
    repr (a log line, an error tracker's locals), and an error whose body quoted the
    gateway's credentials carried them to the caller."""
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        seen.append(auth)
        who = base64.b64decode(auth.removeprefix("Basic ")).decode() if auth else "nobody"
        return web.json_response(
            {"status": 403, "message": f"gateway refused {who}", "error_code": 403}, status=403
        )

    app = web.Application()
    app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://gateway:{GATEWAY_PASSWORD}@127.0.0.1:{port}/v1"
    try:
        async with VioletClient(
            11, "review25-app-secret-0123", token="review25-token-0123456789", base_url=url
        ) as client:
            assert not _shows_password(repr(client))
            with pytest.raises(PermissionDeniedError) as info:
                await client.list_bag_refunds(ORDER_ID, BAG_ID)
    finally:
        await runner.cleanup()
    assert seen
    assert seen[0].startswith("Basic ")  # the gateway did get its credentials
    error = info.value
    for text in (str(error), repr(error), error.body.decode(), str(error.message)):
        assert not _shows_password(text), text


def test_the_command_line_names_a_login_url_without_its_password() -> None:
    """A batch stopped because the login was answered (no Violet API at that URL) named
    the base URL in its reason, password and all."""
    url = f"https://gateway:{GATEWAY_PASSWORD}@violet-gw.internal/v1"
    error = api_error_from_response(404, b"{}", {}, method="POST", path="/login")
    reason = _stop_reason(error, url)
    assert "violet-gw.internal" in reason
    assert not _shows_password(reason)


@pytest.mark.parametrize(
    "options",
    [
        {"max_interval": 0.0},
        {"max_interval": -1.0},
        {"timeout": math.nan},
        {"poll_interval": math.nan},
    ],
)
async def test_wait_for_refund_refuses_waits_that_poll_without_end(
    options: dict[str, float],
) -> None:
    """``wait_for_refund(max_interval=0)`` (or below) polled the refund in a loop with
    no wait between reads (Violet's limits are the merchant's, shared with its
    refunds), and a NaN ``timeout`` never ran out. Both are refused now, nothing read."""
    reads = 0

    async def processing(request: web.Request) -> web.Response:
        nonlocal reads
        reads += 1
        return web.json_response(
            {
                "id": 9100,
                "order_id": ORDER_ID,
                "bag_id": BAG_ID,
                "amount": 300,
                "status": "PROCESSING",
            }
        )

    app = web.Application()
    app.router.add_get("/v1/orders/{o}/refunds/{r}", processing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    clock = FakeClock()
    try:
        async with VioletClient(
            11,
            "review25-app-secret-0123",
            token="review25-token-0123456789",
            base_url=f"http://127.0.0.1:{port}/v1",
            clock=clock,
        ) as client:
            wait = client.wait_for_refund(ORDER_ID, BAG_ID, 9100, **{"timeout": 30.0, **options})
            try:
                await asyncio.wait_for(wait, 2.0)
            except (RequestValidationError, RefundWaitTimeoutError, asyncio.TimeoutError) as exc:
                outcome: BaseException = exc
    finally:
        await runner.cleanup()
    assert isinstance(outcome, RequestValidationError), (outcome, reads)
    assert reads == 0


@pytest.mark.parametrize("differ", ["app_id", "host"])
async def test_a_pending_record_is_never_resumed_by_another_app_or_host(differ: str) -> None:
    """A record left pending by a sandbox client (a 504 whose refund never landed),
    resumed by a client of another app or another Violet host (a job queue shared by
    staging and production workers): order and bag ids are only unique within one
    environment, and the resume read that other bag, proved the ask absent and sent a
    refund there, to a bag nobody asked to refund. Keys are scoped by app and host; the
    record is too now: it is refused there, nothing read or sent."""
    clock = FakeClock()
    sandbox = Hostile(clock, script=[Step(status=504, body=GATEWAY_504, commit_after=None)])
    production = Hostile(clock)
    short = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=20.0)
    async with serve(sandbox) as sandbox_url, serve(production) as production_url:
        other_url = (
            production_url.replace("127.0.0.1", "localhost")
            if differ == "host"
            else (production_url)
        )
        other_app = 12 if differ == "app_id" else 11
        options: dict[str, Any] = {"username": "u", "password": "p-0123456789", "clock": clock}
        async with VioletClient(11, "secret-a", base_url=sandbox_url, retry=short, **options) as a:
            with pytest.raises(AmbiguousOutcomeError) as info:
                await a.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        assert info.value.pending is not None
        assert info.value.pending.scope == "11 127.0.0.1"
        pending = PendingRefund.from_json(info.value.pending.to_json())
        assert pending.scope == "11 127.0.0.1"
        clock.advance(3600.0)
        async with VioletClient(
            other_app, "secret-b", base_url=other_url, retry=ROOMY, **options
        ) as b:
            with pytest.raises(RequestValidationError) as refused:
                await b.resume(pending)
    assert refused.value.field == "pending"
    assert production.posts == 0
    assert production.reads == 0
    assert production.refunds == []
