"""Simulator seed 5062095 (``python benchmarks/simulate.py --kinds all --seed 5062095``,
batch): ``[attribution] A2 was handed refund 400008, made by another actor``.

The story. A2 (250, "Customer requested refund.") read its bag (empty: the baseline)
and sent; Violet answered 429 (``Retry-After: 20``, nothing applied) and the batch
deferred it, its record ABSENT ("every send proven not applied"). 10 s into the wait
another app refunded 250 with the same reason on the bag (400008, t=10.610). The run
crashed (t=10.871); the run after it resumed the record, and the read the SDK makes
before a re-send after a 429 (review 27: "what that read lists is never ours") was
refused (t=11.176, never sent). ``_protocol.step`` then sent anyway
(``READ_FAILED`` in ABSENT with no page listed: ``_send(ask, now, proven=True)``),
its window opening at that re-send (t=11.176). The re-send was answered Violet's
500 (nothing applied). 400008, made 0.57 s before the re-send, sat inside the
window's ``date_tolerance`` (5 s) by this machine's clock, and after the re-send by
the ``Date`` headers (they ran 60 s behind: ``date_lag``), so a read-back 70 s later
took it for A2's own: A2's caller was told the shopper was refunded, and nobody
refunded them on A2's behalf.

README's remaining risk (b) promises that a refund made while a call waited out a
``Retry-After`` is never its own, because the bag is read right before the re-send;
when that read fails, nothing else keeps the promise. The simulator's classifier
(``_named.risk_b``) says so too: condition 6, "made in A2's 429 wait, and A2 sent
again with no read between".

Here the same shape on a server scripted in the test (tests/hostile.py: one bag on
127.0.0.1, port 0, on a FakeClock shared with the client), a direct call: a 429 with
``Retry-After: 20``; another system's identical refund 19.5 s later, when the refund
list starts failing (503) until t=30 s, so the read before the re-send fails after
its own retries; the re-send is answered Violet's 500 (nothing applied); the next
send commits. Before the fix the read-back after the 500 took the other system's
refund for the call's own. Now a failed read before a re-send that listed nothing is
read again (never sent), and at the call's deadline the ask ends as a failed baseline
read does (the read's error; not sent, every send proven not applied); the seed
replays with no violation.

Run: ``pytest -q -p no:cacheprovider --no-cov tests/test_sim5062095.py``.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy, VioletError
from violet_async._engine import Outcome, outcome_of
from violet_async.testing import FakeClock
from violet_async.testing.sim import WORLD_KINDS, simulate

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client

AMOUNT = 250


@attrs.define
class ListDown(Hostile):
    """While ``down``, every read of the refund list is answered 503 (a gateway's)."""

    down: bool = False

    async def _list(self, request: web.Request) -> web.Response:
        if self.down:
            self.reads += 1
            return web.Response(status=503, body=b"<html>503 Service Unavailable</html>")
        return await super()._list(request)


async def test_a_failed_read_before_a_re_send_never_sends_into_a_refund_made_in_the_wait() -> None:
    """A 429 (``Retry-After: 20``), another system's identical refund 19.5 s into the
    wait, the read before the re-send fails (503 until t=30 s). The ask is never
    handed the other system's refund: it is not sent before a read of the bag lists
    it (then it is in the baseline), and its own refund comes from its own send."""
    clock = FakeClock()
    server = ListDown(clock)
    server.script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    others: list[dict[str, Any]] = []

    def other_refund() -> None:
        others.append(server.add_refund(AMOUNT))
        server.down = True

    def heal() -> None:
        server.down = False

    clock.call_later(19.5, other_refund)
    clock.call_later(30.0, heal)
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert others, "the other system's refund was made"
    other = others[0]["id"]
    assert isinstance(got, OrderRefund), got
    assert got.id != other, "another system's refund was returned as this ask's own"
    assert got.id in server.ours
    assert server.posts == 3


async def test_a_read_before_a_re_send_that_fails_until_the_deadline_ends_not_sent() -> None:
    """The same, with the refund list down until long after the call's deadline: the
    ask is never sent again and never handed the other system's refund. It ends with
    the read's error, as a failed baseline read does: not sent (every send proven not
    applied), so it may be asked again; the bag is marked, so the repeat reads first."""
    clock = FakeClock()
    server = ListDown(clock)
    server.script = [Step(429, commit_after=None, headers={"Retry-After": "20"})]
    others: list[dict[str, Any]] = []

    def other_refund() -> None:
        others.append(server.add_refund(AMOUNT))
        server.down = True

    clock.call_later(19.5, other_refund)
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=60.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        with pytest.raises(VioletError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        assert not isinstance(caught.value, AmbiguousOutcomeError)
        assert outcome_of(caught.value) is Outcome.NOT_SENT
        assert server.posts == 1
        server.down = False
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert got.id != others[0]["id"], "another system's refund was returned as the repeat's"
    assert got.id in server.ours
    assert server.posts == 2


def test_seed_5062095_replays_with_no_violation() -> None:
    """The seed itself (``--kinds all``, batch): A2's resume reads again after the
    refused read, lists 400008 (then never its own) and is refunded by its own send."""
    result = simulate(5062095, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
