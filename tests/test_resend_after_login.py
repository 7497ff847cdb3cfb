"""A re-send that opens the window anew stays "not sent" in its record until it leaves,
with or without a wait before it.

Simulator seed 1097210 (batch mode): a row's POST was answered 429 (nothing applied)
and its run died. The next run resumed the row at once (no wait), saved its record
"sent" as planned and logged in first; the login never connected and that run died
too. The run after it read the bag back and took a refund another system had made
3.6 s before that record's time (within ``date_tolerance``) for the row's own: the
request it stood for had never left. Only a re-send after a wait (a 429's
Retry-After, a backoff) was saved "not sent" until it left (seed 923128); one with no
wait was saved "sent" before its login.

Scripted on tests/hostile.py's server and a FakeClock shared with both clients;
refunds are counted by the server's own record."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy, VioletClient
from violet_async._ask import Phase
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, Hostile, Step, serve

RETRY = RetryPolicy(max_attempts=3, deadline=120.0)
AMOUNT = 300
KEY = "rma-resend-after-login"


def _client(url: str, clock: FakeClock, store: MemoryStore) -> VioletClient:
    """A client of its own (another process: its own token, so its first request
    logs in) on the shared key store."""
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


async def test_a_resumed_re_send_that_never_left_its_login_is_not_taken_as_sent() -> None:
    """A keyed call's POST is answered 429 (Retry-After 20 s) and the caller cancels
    during the wait: the key's record says "not sent" (ABSENT). Another process repeats
    the key: the re-send needs no wait, but its client logs in first, slowly; another
    system refunds the same amount meanwhile, and that caller cancels too before the
    request leaves. The record must still say "not sent": a third repeat sends the
    refund and gets its own, never the other system's."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(429, commit_after=None, headers={"Retry-After": "20"})])
    store = MemoryStore()
    async with serve(server) as url:
        async with _client(url, clock, store) as first:
            call = asyncio.ensure_future(
                first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
            )
            clock.call_later(5.0, call.cancel)
            with pytest.raises(asyncio.CancelledError):
                await call
        assert server.posts == 1
        saved = await store.load(next(iter(store._entries)))  # the key's one entry
        assert saved is not None
        assert saved.ask.phase is Phase.ABSENT

        server.login_delay = 30.0
        async with _client(url, clock, store) as second:
            call = asyncio.ensure_future(
                second.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
            )
            clock.call_later(10.0, lambda: server.add_refund(AMOUNT))
            clock.call_later(20.0, call.cancel)
            with pytest.raises(asyncio.CancelledError):
                await call
        assert server.posts == 1, "nothing left during the login"
        other = server.refunds[0]["id"]
        saved = await store.load(saved.key)
        assert saved is not None
        assert saved.ask.phase is not Phase.SENT, "saved as sent before a login it never left"

        server.login_delay = 0.0
        clock.advance(5.0)
        async with _client(url, clock, store) as third:
            try:
                got: OrderRefund | AmbiguousOutcomeError = await third.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
                )
            except AmbiguousOutcomeError as exc:
                got = exc
    assert isinstance(got, OrderRefund), got
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]
