"""Review 35: after a bag's read-first mark lapsed (2 x clock_skew + 5 s + 1 s,
126 s by default, after the cut), a 2xx answer naming the refund another system made
during the cut call's 429 wait was returned as the repeat's own refund (a refund this
ask never made, reported applied). The mark's life covers the read-back's match
window, but the age check of a 2xx answer (``_requests.AnswerCheck``) was measured by
the answer's own ``Date`` alone, over connect + read timeouts + ``clock_skew`` (95 s by
default), and skipped when there was no ``Date``. Now a 2xx naming a refund dated
before the call began (less ``clock_skew`` and ``date_tolerance``), by this machine's
clock, is read back too (``AnswerCheck.not_before``).

Within the mark's life the same answer is read back, never returned (the repeat's
baseline lists the refund): tests/test_review35_findings.py
``test_within_the_marks_life_a_2xx_naming_a_refund_made_in_the_cut_wait_is_read_back``.
"""

from __future__ import annotations

from typing import Any

import pytest

from violet_async import OrderRefund, Timeouts

from .test_review35_findings import replayed_after_cut

CASES: dict[str, tuple[float, dict[str, Any], Timeouts | None]] = {
    # A slow platform's read timeout of 90 s: the 2xx may name a refund up to
    # 5 + 90 + 60 = 155 s older than the answer's Date; the mark lapsed at 126 s.
    "read-timeout-90s": (126.5, {}, Timeouts(read=90.0)),
    # A Date header 100 s behind Violet's clock (a CDN's): the refund looks 27 s old.
    "date-100s-behind": (126.5, {"header_skew": -100.0}, None),
    # No Date header: the age is not checked at all, however old the refund.
    "no-date": (126.5, {"no_date": True}, None),
    "no-date-an-hour-later": (3600.0, {"no_date": True}, None),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_after_the_mark_lapsed_a_2xx_naming_a_refund_made_in_the_cut_wait_is_not_returned(
    case: str,
) -> None:
    """A call waits out a 429 (Retry-After 20 s); another system refunds the same
    amount 0.3 s before the caller cuts the call as the wait ends. The caller repeats
    after the mark lapsed (126.5 s after the cut, or an hour), so the repeat sends
    unread, and Violet answers its POST 200 with that other refund's record (a
    replayed or cached answer; nothing of the repeat applied). The answer passes
    ``AnswerCheck`` (its age by the answer's Date is within connect + read +
    clock_skew, or there is no Date to age it by) and the repeat returns another
    system's refund as its own."""
    later, options, timeouts = CASES[case]
    got, other = await replayed_after_cut(later, dict(options), timeouts)
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
