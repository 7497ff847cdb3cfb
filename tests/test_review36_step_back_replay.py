"""Review 36: review 35's replayed 2xx, after a wall clock step BACK the client saw.

The story. A client is made with its wall clock right. The wall clock then steps back
10 minutes (an operator, or NTP gone wrong; the client sees it: its monotonic clock
did not move). A refund call waits out a 429 (``Retry-After: 20``); another system
refunds the same amount 0.3 s before the caller cuts the call as the wait ends. The
caller repeats 126.5 s after the cut (the bag's read-first mark, 126 s on both clocks,
has lapsed), so the repeat sends unread, and Violet (a replayed or cached answer)
answers its POST 200 with that other system's refund; nothing of the repeat applied.
The answer has no ``Date`` (or one 100 s behind Violet's clock, review 35's CDN).

3d424f2 refuses such an answer by ``AnswerCheck.not_before`` = ``origin.steady(clock)
- clock_skew - date_tolerance``; ``steady`` is the minimum of the clock as it is and as
it was before the step, so after a step back it is the stepped-back clock, 10 minutes
behind: the other refund, 127 s old, is "after the call began" and is returned as the
repeat's own refund (a refund this ask never made, reported applied). Without the step
(tests/test_review35_2xx_after_mark.py) the same answer is read back.

Now ``not_before`` is judged by the clock as it read when the client was made, carried
forward on the monotonic clock past the step (``ClockOrigin.as_made``): the answer is
read back. (Failed on main 3d424f2.)
"""

from __future__ import annotations

from typing import Any

import pytest

from violet_async import OrderRefund

from .test_review36_findings import replay_after_step_back

CASES: dict[str, dict[str, Any]] = {
    "no-date": {"no_date": True},
    "date-100s-behind": {"header_skew": -100.0},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_after_a_step_back_a_replayed_2xx_naming_a_refund_of_the_cut_wait_is_not_returned(
    case: str,
) -> None:
    got, other = await replay_after_step_back(-600.0, dict(CASES[case]))
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
