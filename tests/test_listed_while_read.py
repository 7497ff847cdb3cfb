"""A refund that appeared while the first read after the send ran is never "made long
before the send".

Simulator seed 72 (risk (g)'s world, forced: the machine's wall clock 15 h ahead of
Violet's refund-dating clock from the start, ``Date`` headers 15 h ahead too, precise
dates, one refund per page): the ask's POST reached Violet 13 s after it left (its
answer lost), so the first read after the send did not list the refund; the first read
that came back whole had its first pages answered before the refund was made (counting
6 refunds) and its last pages after (counting 7), the refund on its last page. The
record took every id of that read as "listed by the first read after the send", so the
ask's own refund, dated 15 h before the send by every reading, was skipped as made long
before it, proven absent after the settle window and sent again. Two refunds. Pages
that count more refunds than the read's first page answered from a list that grew
while the read ran: what they alone list may have appeared since the send.

Scripted on tests/hostile.py's server and a FakeClock shared with the client; refunds
are counted by the server's own record."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, RetryPolicy
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_502, ORDER_ID, Hostile, Step, hostile_client

HOURS_15 = 15 * 3600.0
AMOUNT = 300


class GrowsUnderTheRead(Hostile):
    """The ask's POST is answered 502 with nothing applied yet; its refund is made as
    the first read after it asks for a page after the first (a POST that reached
    Violet late), so that read's first page counts fewer refunds than its last."""

    late: dict[str, Any] | None = None

    async def _list(self, request: web.Request) -> web.Response:
        if self.late is not None and request.query.get("page", "0") != "0":
            body, self.late = self.late, None
            self._commit(body, cancel=False)
        return await super()._list(request)


async def test_a_refund_listed_only_on_pages_that_grew_is_not_old() -> None:
    clock = FakeClock()
    # Violet's clock (its refund dates) is the machine's true time; the client is made
    # after its wall clock stepped 15 h ahead, and every Date header is 15 h ahead of
    # Violet's own clock too (both readings agree, both wrong).
    server = GrowsUnderTheRead(
        clock,
        script=[Step(502, GATEWAY_502, commit_after=None), Step(200)],
        page_size=1,
        header_skew=HOURS_15,
    )
    server.add_refund(50, age=7_200.0)
    server.add_refund(70, age=3_600.0)
    server.late = {"amount_refunded": AMOUNT}
    clock.step_wall(HOURS_15)
    async with hostile_client(server, retry=RetryPolicy(max_attempts=4, deadline=None)) as c:
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await c.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert server.late is None, "the refund was never made under the first read"
    assert server.posts == 1, "sent again over its own refund"
    assert len(server.ours) == 1
    pending = caught.value.pending
    assert pending is not None
    assert pending.listed_after_send is not None
    assert server.ours[0] not in pending.listed_after_send
