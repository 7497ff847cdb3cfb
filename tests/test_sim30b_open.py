"""Open (found by the simulator's all-kinds run on this branch, seeds 920240 and
922284; not fixed): a step of this machine's wall clock since the client was made,
with Violet's clock ahead of this machine's by less than ``clock_skew`` (60 s), lets a
call take another system's refund, dated before the call's only send by Violet's own
``Date``, for its own. Without the step the same refund is for review. Marked
``xfail(strict=True)``: it must fail until fixed, and then the mark must go.

Against review 14's scripted server (refunds counted by its own record), on a virtual
clock."""

from __future__ import annotations

import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund
from violet_async.testing import FakeClock

from .samples import refund_body
from .test_review11_findings import _ended, _stamp
from .test_review14_findings import BAG, ORDER, REQUEST, Scripted, _client, _serve


@pytest.mark.xfail(strict=True, reason="open: a step since the client was made, Violet ahead")
@pytest.mark.parametrize("step", [-10_800.0, 10_800.0])
async def test_a_refund_before_the_send_is_not_claimed_after_a_step_with_violet_ahead(
    step: float,
) -> None:
    """Scenario: the client is made; 0.1 s later this machine's wall clock steps 3 h
    (NTP); Violet's clock is 58 s ahead of this machine's true time and says so in its
    ``Date`` headers. At +10 s another system refunds the same 5.00 on the bag; at
    +20 s the call sends (answered 500, not applied) and reads the bag back.

    Found: the call returns the other system's refund (``reconciled``) as its own; its
    shopper is never refunded. With no step (or Violet's clock behind) it is for
    review. The same with a 429 before the send (the simulator's ``refund_in_429``).

    True outcome: pending or for review (the refund predates the only send by 10 s on
    Violet's own clock), never that refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost"])
    async with _serve(server) as url, _client(url, clock, deadline=600.0, attempts=4) as client:
        clock.advance(0.1)
        clock.step_wall(step)
        server.stepped = step - 58.0  # Violet's clock: unmoved by the step, 58 s ahead
        start = server.violet_time()

        def other() -> None:
            server.made.append(
                refund_body(
                    id=9_999,
                    order_id=ORDER,
                    bag_id=BAG,
                    amount=500,
                    status="COMPLETED",
                    skus=[],
                    errors=[],
                    date_created=_stamp(start + 10.0),
                    date_last_modified=_stamp(start + 10.0),
                )
            )

        clock.call_later(10.0, other)
        clock.advance(20.0)
        got = await _ended(client.refund_bag(ORDER, BAG, REQUEST))
    assert server.posts == 1
    assert not isinstance(got, OrderRefund), f"the call took refund {got.id} for its own"
    assert isinstance(got, AmbiguousOutcomeError), repr(got)
