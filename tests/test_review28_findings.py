"""Review 28: an adversarial review of the 429 wait and its read, the kept POST of a
cancelled call, the fleet's pipelined applied write and reviews 25-27's guards, each
shown on a server scripted in its test (tests/hostile.py: one order with one bag on
127.0.0.1, port 0, on a FakeClock shared with the client) or on the pure protocol."""

from __future__ import annotations

import attrs

from violet_async import RetryPolicy
from violet_async._protocol import Do, Observation, Phase, start, step
from violet_async.batch import BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Step, hostile_client
from .test_resend_window import SETTINGS, T0, busy, lost, refund, sent
from .test_review27_findings import NoDate

AMOUNT = 300
DEFER = attrs.evolve(SETTINGS, defer_rate_limited=True)


def test_a_deferred_429_is_resumed_with_a_read_of_the_bag_before_its_re_send() -> None:
    """A batch or fleet defers a 429 (``defer_rate_limited``) and resumes the ABSENT
    record when its merchant's turn comes: the re-send went at once, without the read
    a call that waits in place makes. Another system's refund of the same amount made
    during the deferral, no ``Date`` to date it by (this machine's clock within
    ``clock_skew``), the re-send answered with nothing: the read after the window took
    that refund for the ask's own. Resumed, it is read first, as in place."""
    other = refund(9_999, T0 + 10.0)
    deferred, action = step(sent(), busy(), DEFER, T0, 500.0)
    assert (deferred.phase, action.do) == (Phase.ABSENT, Do.DEFER)
    ask, action = start(deferred, DEFER, T0 + 20.0, attempt_timeout=5.0)
    assert action.do is Do.READ
    assert not action.read_bag
    ask, action = step(ask, Observation.read(T0 + 20.0, [other]), DEFER, T0 + 20.0, 480.0)
    assert action.do is Do.SEND
    assert ask.baseline is not None
    assert 9_999 in ask.baseline
    ask, action = step(ask, lost(T0 + 20.0), DEFER, T0 + 21.0, 480.0)
    after = T0 + 100.0
    ask, action = step(ask, Observation.read(after, [other]), DEFER, after, 400.0)
    assert action.do is Do.SEND, ask.note  # proven absent: never the other's refund


async def test_a_batch_row_deferred_after_a_429_never_takes_anothers_refund() -> None:
    """A batch row's POST is answered 429 (Retry-After 20 s); another system refunds
    the same amount 3 s later; the row's turn comes and its re-send is answered 500
    (Violet's own, nothing applied). With no ``Date`` to date refunds by, the read-back
    reported the other system's refund as the row's (succeeded, reconciled): the
    shopper never refunded. The row reads the bag before its re-send now."""
    clock = FakeClock()
    server = NoDate(clock)
    server.script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    clock.call_later(3.0, lambda: server.add_refund(AMOUNT))
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=AMOUNT))
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        results = [r async for r in run_batch(client, [item], patience=600.0)]
    other = server.refunds[0]["id"]
    assert len(results) == 1
    got = results[0]
    assert got.refund is None or got.refund.id != other, (
        "another system's refund reported as the row's"
    )
    assert got.outcome == "succeeded", got
    assert got.refund is not None
    assert server.ours == [got.refund.id]
    # The 429, the re-send answered 500 (the bag read first), the send once that one
    # was proven absent after its window.
    assert server.posts == 3
