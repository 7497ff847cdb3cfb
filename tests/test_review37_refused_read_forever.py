"""Review 37: the read before a re-send after a 429 (7a7cb32) that is REFUSED, with no
deadline, was read again forever: the call never ended.

Story: a refund's POST is answered 429 (Retry-After 20 s). Every send so far is proven
not applied. The read of the bag before the re-send is answered 403 (a token whose
scope lost the refunds list; 401/404/400 alike): after its own retries the read fails
listing nothing. Since 7a7cb32 the protocol reads again after ``settle_delay`` instead
of sending, and ends FAILED (RESEND_READ_FAILED, not sent) only "at the deadline". With
``RetryPolicy(deadline=None)`` there is none: the call reads the bag every settle_delay
forever while it holds the bag (every later ask on the bag waits behind it), where a
failed baseline read in phase NEW ends at once (BASELINE_READ_FAILED). Nothing was
applied and nothing more will be sent: the outcome is known (not sent).

The scripted server (tests/hostile.py, 127.0.0.1 port 0, FakeClock shared with the
client) stops refusing after 200 reads so that the test ends; the call must have ended
long before (not sent) instead.

Now (review 37's fix, in ``_protocol.step``, phase ABSENT, nothing listed): with no
deadline the call ends not sent at once, as a failed baseline read does, and a refusal
(400/401/403/404), which no wait mends, ends it at once too.
"""

from __future__ import annotations

import attrs
from aiohttp import web

from violet_async import OrderRefund, RetryPolicy
from violet_async._engine import Outcome, outcome_of
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

LOOPS = 200


@attrs.define
class RefusedList(Hostile):
    """Once the first POST was answered, the list answers ``refusal`` until ``LOOPS``
    reads were refused."""

    refusal: int = 403
    refusing: bool = False
    refused: int = 0

    async def _list(self, request: web.Request) -> web.Response:
        if self.refusing and self.refused < LOOPS:
            self.refused += 1
            self.reads += 1
            return web.json_response(
                {"status": self.refusal, "message": "Forbidden", "error_code": 1003},
                status=self.refusal,
            )
        return await super()._list(request)


async def _run(refusal: int) -> tuple[RefusedList, OrderRefund | BaseException]:
    clock = FakeClock()
    server = RefusedList(clock, refusal=refusal)
    server.script = [Step(429, commit_after=None, headers={"Retry-After": "20"})]

    async def refuse_from_now() -> None:
        server.refusing = True

    server.on_answer = refuse_from_now
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=None, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | BaseException = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=300
            )
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            got = exc
    return server, got


async def test_a_refused_read_before_a_re_send_with_no_deadline_ends_not_sent() -> None:
    server, got = await _run(403)
    assert server.refused < LOOPS, (
        f"the call read the refused bag {server.refused} times and only ended when the "
        f"server stopped refusing (it would never have ended): {got!r}"
    )
    assert not isinstance(got, OrderRefund)
    assert outcome_of(got) is Outcome.NOT_SENT, got
    assert server.posts == 1


async def test_a_read_refused_401_before_a_re_send_with_no_deadline_ends() -> None:
    server, got = await _run(401)
    assert server.refused < LOOPS, f"read {server.refused} times: {got!r}"
    assert outcome_of(got) is Outcome.NOT_SENT, got
