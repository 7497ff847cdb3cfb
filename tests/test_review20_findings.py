"""Review 20: attacks an outsider would try on today's main.

Each test scripts its own server (tests/hostile.py) on a FakeClock shared with the
client; refunds are counted by the server's own record."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from aiohttp import web

from violet_async import AmbiguousOutcomeError, CancellationFailedError, OrderRefund, RetryPolicy
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, Hostile, hostile_client

RETRY = RetryPolicy(max_attempts=3, deadline=120.0)


@attrs.define
class ForeignCancellation(Hostile):
    """Every cancel POST commits (the bag is cancelled, its rest refunded) and is
    answered 202 with ``body``: a cancellation body that is not about this bag."""

    body: dict[str, Any] = attrs.Factory(dict)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        self._commit(await request.json(), cancel=True)
        return web.Response(
            status=202, body=orjson.dumps(self.body), content_type="application/json"
        )


async def _cancel_outcome(server: Hostile) -> OrderRefund | BaseException:
    async with hostile_client(server, retry=RETRY) as client:
        try:
            return await client.cancel_bag(ORDER_ID, BAG_ID)
        except (CancellationFailedError, AmbiguousOutcomeError) as exc:
            return exc


async def test_a_cancellation_failure_of_another_order_is_not_this_cancels_failure() -> None:
    """The cancel applied (the bag is cancelled and refunded), but the 202 answered is
    a CANCELLATION_FAILURE of another order (a misrouted or cached answer). An answer
    naming another order is not this call's (as a refund of another order is not):
    it was reported as a definite failure of this cancel, a cancel that moved the
    shopper's money; a caller falling back to a refund would refund the bag twice."""
    server = ForeignCancellation(
        FakeClock(),
        body={
            "order_id": ORDER_ID + 1,
            "app_id": APP_ID,
            "status": "CANCELLATION_FAILURE",
            "cancelled_bags": [],
            "message": f"order {ORDER_ID + 1} could not be cancelled",
        },
    )
    got = await _cancel_outcome(server)
    assert not isinstance(got, CancellationFailedError), got
    assert server.posts == 1
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours


async def test_a_cancellation_failure_naming_only_another_bag_is_not_this_cancels() -> None:
    """The same with a failure body of this order whose one entry is another bag's
    CANCELLATION_FAILURE: it says nothing of this bag, whose cancel applied."""
    server = ForeignCancellation(
        FakeClock(),
        body={
            "order_id": ORDER_ID,
            "app_id": APP_ID,
            "status": "CANCELLATION_FAILURE",
            "cancelled_bags": [
                {"order_id": ORDER_ID, "bag_id": BAG_ID + 1, "status": "CANCELLATION_FAILURE"}
            ],
            "message": f"bag {BAG_ID + 1} could not be cancelled",
        },
    )
    got = await _cancel_outcome(server)
    assert not isinstance(got, CancellationFailedError), got
    assert server.posts == 1
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours
