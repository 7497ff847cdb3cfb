"""Review 36, open: review 35's replayed 2xx, naming a refund whose date places nothing.

The story (review 35's, tests/test_review35_2xx_after_mark.py): a call waits out a 429
(``Retry-After: 20``); another system refunds the same amount 0.3 s before the caller
cuts the call as the wait ends; the caller repeats 126.5 s after the cut (the bag's
read-first mark has lapsed), so the repeat sends unread, and Violet (a replayed or
cached answer) answers its POST 200 with that other system's refund; nothing of the
repeat applied. Here the platform dates refunds without a UTC offset (server-local
time, ``naive_dates``) or not at all (``null_dates``), with Violet's ``Date`` header
right or missing. ``AnswerCheck._misdated`` returns "" for a refund whose date has no
offset or is missing (``date_span`` is None), so neither ``not_before`` nor the
``Date`` age check runs: the other system's refund is returned as the repeat's own.

Run: pytest -q -p no:cacheprovider --no-cov tests/open_review36_undated_replay.py
(it fails on main 3d424f2: the other system's refund is returned).
"""

from __future__ import annotations

from typing import Any

import pytest

from violet_async import OrderRefund

from .test_review35_findings import replayed_after_cut

CASES: dict[str, dict[str, Any]] = {
    "naive-dates-with-date": {"naive_dates": True},
    "naive-dates-no-date": {"naive_dates": True, "no_date": True},
    "null-dates-with-date": {"null_dates": True},
    "null-dates-no-date": {"null_dates": True, "no_date": True},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_replayed_2xx_naming_an_undated_refund_of_the_cut_wait_is_not_returned(
    case: str,
) -> None:
    got, other = await replayed_after_cut(126.5, dict(CASES[case]))
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
