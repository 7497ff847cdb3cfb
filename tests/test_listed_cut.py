"""A caller's cancel keeps what the first read after the send listed.

Simulator seed 318 (risk (g)'s world, forced: the machine's wall clock 15 h ahead of
Violet's refund-dating clock, ``Date`` headers 15 h ahead too): the ask's POST applied
behind a 5xx; the first read after the send listed another system's refund only, not
the ask's own. The caller then cancelled the call during the read-backs. The record a
cancel hands out (``BagPendingError.pending``, the one a keyed repeat resumes) was the
one saved before the send, without that listing: the repeat's first read listed the
ask's own refund, dated 15 h before the send by every reading, took it as "made long
before the send", proved the ask absent after its settle window and sent it again.
Two refunds. The record a cancel leaves carries the listing its read-backs learned.

Scripted on tests/hostile.py's server and a FakeClock shared with the client; refunds
are counted by the server's own record."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, BagPendingError, OrderRefund, RetryPolicy
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_502, ORDER_ID, Hostile, Step, hostile_client

HOURS_15 = 15 * 3600.0
AMOUNT = 300
KEY = "rma-listed-cut"


class CutAfterFirstRead(Hostile):
    """Cancels ``call`` half a second (shared clock) after the first read-back was
    answered: during the wait before the next one."""

    call: asyncio.Future[Any] | None = None

    async def _list(self, request: web.Request) -> web.Response:
        response = await super()._list(request)
        if self.call is not None:
            call, self.call = self.call, None
            self.clock.call_later(0.5, call.cancel)
        return response


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "resume"])
async def test_a_cancel_keeps_the_listing_of_the_first_read(keyed: bool) -> None:
    clock = FakeClock()
    # Violet's clock (its refund dates) is the machine's true time; the client is made
    # after its wall clock stepped 15 h ahead, and every Date header is 15 h ahead of
    # Violet's own clock too (both readings agree, both wrong).
    server = CutAfterFirstRead(
        clock,
        # The POST applies, answered 502; the refund is listed 3 s later (after the
        # first read-back).
        script=[Step(502, GATEWAY_502, commit_after=0.0), Step(200)],
        list_lag=3.0,
        header_skew=HOURS_15,
    )
    server.add_refund(50, age=7_200.0)  # another system's, listed by every read
    clock.step_wall(HOURS_15)
    key = KEY if keyed else None
    options: dict[str, Any] = {"retry": RetryPolicy(max_attempts=4, deadline=None)}
    if keyed:
        options["store"] = MemoryStore()
    async with hostile_client(server, **options) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key)
        )
        server.call = call
        with pytest.raises(asyncio.CancelledError):
            await call
        assert server.call is None, "not cancelled during the read-backs"
        assert server.posts == 1
        assert len(server.ours) == 1
        first_reads = server.reads
        clock.advance(5.0)  # the ask's refund is listed from now on
        got: OrderRefund | AmbiguousOutcomeError
        handed: frozenset[int] | None = None
        try:
            if keyed:
                got = await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key
                )
            else:
                with pytest.raises(BagPendingError) as caught:
                    await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
                (pending,) = caught.value.pending
                handed = pending.listed_after_send
                got = await client.resume(pending)
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.reads > first_reads, "the repeat never read the bag back"
    assert len(server.ours) == 1, f"{len(server.ours)} refunds of one ask"
    assert server.posts == 1, "sent again over its own refund"
    if isinstance(got, OrderRefund):
        assert got.id == server.ours[0]
    if not keyed:
        # The record handed out with BagPendingError says what the first read listed.
        assert handed is not None, "the first read's listing lost"
        assert server.ours[0] not in handed
