"""The audit's per-bag verdicts as pure functions: repeats, overlapping rows, whole-bag
refunds and cancels, refunds that moved no money, the journal breaking ties."""

from __future__ import annotations

from typing import Any

from violet_async import CancelBagRequest, RefundBagRequest, SkuRefund
from violet_async._audit_judge import Asked, JournalView, _assign, format_money, judge_bag
from violet_async._converter import converter
from violet_async.batch import BatchItem
from violet_async.models import OrderBag, OrderRefund

ORDER, BAG = 1, 2


def rec(refund_id: int, amount: int, reason: str | None = None, **more: Any) -> OrderRefund:
    data = {
        "id": refund_id,
        "order_id": ORDER,
        "bag_id": BAG,
        "merchant_id": 1,
        "app_id": 1,
        "transaction_id": 1,
        "gateway_transaction_id": "pi",
        "amount": amount,
        "reason": reason,
        "status": "COMPLETED",
        **more,
    }
    return converter.structure(data, OrderRefund)


def bag(status: str = "PARTIALLY_REFUNDED", total: int = 5000) -> OrderBag:
    return converter.structure({"id": BAG, "status": status, "total": total}, OrderBag)


def row(line: int, amount: int | None, reason: str | None = None, **more: Any) -> Asked:
    request = RefundBagRequest(amount_refunded=amount, reason=reason, **more)
    return Asked(BatchItem.refund(line, ORDER, BAG, request))


def verdicts(rows: list[Asked], refunds: list[OrderRefund], on: OrderBag | None = None) -> Any:
    judged = judge_bag(rows, refunds, on or bag(), "USD")
    return [(r.audit, r.refund_ids) for r in judged]


def test_identical_rows_each_take_one_refund_and_a_third_refund_is_extra() -> None:
    """Two identical rows and two identical refunds: both as_asked; a third refund is
    one double on the first row; with one refund the second row is missing."""
    rows = [row(2, 500, "x"), row(3, 500, "x")]
    assert verdicts(rows, [rec(1, 500, "x"), rec(2, 500, "x")]) == [
        ("as_asked", (1,)),
        ("as_asked", (2,)),
    ]
    three = verdicts(rows, [rec(1, 500, "x"), rec(2, 500, "x"), rec(3, 500, "x")])
    assert three == [("extra", (1, 3)), ("as_asked", (2,))]
    assert verdicts(rows, [rec(1, 500, "x")]) == [("as_asked", (1,)), ("missing", ())]


def test_the_largest_assignment_wins_over_line_order() -> None:
    """A row without a reason matches both refunds, a row with one matches one: both
    are as_asked, whichever comes first."""
    rows = [row(2, 500), row(3, 500, "x")]
    assert verdicts(rows, [rec(1, 500, "x"), rec(2, 500, "y")]) == [
        ("as_asked", (2,)),
        ("as_asked", (1,)),
    ]
    assert _assign([[0, 1], [0]]) == {0: 1, 1: 0}
    assert _assign([[0], [0], []]) == {0: 0}


def test_the_journal_refund_is_taken_first() -> None:
    """Two identical refunds, one row whose journal names the second: that one is the
    row's, the first is the extra; the journal's is also 'ours'."""
    asked = Asked(row(2, 500, "x").item, JournalView("journal", "done", 2))
    judged = judge_bag([asked], [rec(1, 500, "x"), rec(2, 500, "x")], bag(), "USD")
    assert [(r.audit, r.refund_ids, r.ours) for r in judged] == [("extra", (2, 1), True)]


def test_whole_bag_and_cancel_rows_match_by_the_bag_and_what_was_left() -> None:
    """A whole-bag refund of what was left is as_asked on a REFUNDED bag (an earlier
    refund no row asked for is extra); a cancel likewise on a CANCELED bag; a refund of
    part of the bag under a whole-bag or cancel row is a mismatch saying so."""
    whole = [row(2, None)]
    assert verdicts(whole, [rec(2, 5000)], bag("REFUNDED")) == [("as_asked", (2,))]
    refunds = [rec(1, 1000), rec(2, 4000)]
    assert verdicts(whole, refunds, bag("REFUNDED")) == [("extra", (2, 1))]
    partial = judge_bag(whole, [rec(2, 2000)], bag("COMPLETED"), "USD")
    assert partial[0].audit == "mismatch"
    assert "the whole bag was asked: refunded 2000 of a bag of 5000" in partial[0].detail
    cancel = Asked(BatchItem.cancel(2, ORDER, BAG, CancelBagRequest(reason="gone")))
    assert verdicts([cancel], [rec(7, 5000, "gone")], bag("CANCELED")) == [("as_asked", (7,))]
    judged = judge_bag([cancel], [rec(7, 2000, "gone")], bag("COMPLETED"), "USD")
    assert judged[0].audit == "mismatch"
    assert "a cancel was asked: refunded 2000 of a bag of 5000" in judged[0].detail


def test_refunds_that_moved_no_money_are_named_never_counted() -> None:
    """A FAILED refund exactly like the row: the row is missing (its amount), the failed
    refund is named on it, and it is never extra."""
    judged = judge_bag([row(2, 500, "x")], [rec(1, 500, "x", status="FAILED")], bag(), "USD")
    assert [(r.audit, r.money) for r in judged] == [("missing", 500)]
    assert "no money moved: refund 1 USD 5.00 FAILED" in judged[0].detail


def test_an_amount_alone_is_not_an_almost_match() -> None:
    """A row with only an amount and a refund of another amount: missing, and the
    refund is reported as asked by no row (its money counted), not a mismatch."""
    judged = judge_bag([row(2, 500)], [rec(1, 1200, status="EXTERNAL")], bag(), "USD")
    assert [(r.audit, r.unasked_money) for r in judged] == [("missing", 1200)]
    assert "asked by no row: refund 1 USD 12.00 EXTERNAL" in judged[0].detail


def test_lines_and_reason_differences_are_mismatches_in_words() -> None:
    """The same amount with other SKU units, and the same amount with another reason."""
    lines = row(2, 500, skus=[SkuRefund(order_sku_id=10, quantity_refunded=2)])
    refund = rec(1, 500, skus=[{"order_sku_id": 10, "quantity_refunded": 1}])
    judged = judge_bag([lines], [refund], bag(), "USD")
    assert judged[0].audit == "mismatch"
    assert "lines: asked {10: 2}, refunded {10: 1}" in judged[0].detail
    judged = judge_bag([row(2, 500, "late")], [rec(1, 500, "early")], bag(), "USD")
    assert judged[0].audit == "mismatch"
    assert "reason: asked 'late', refund says 'early'" in judged[0].detail


def test_missing_names_the_journal_loudly_only_when_it_says_succeeded() -> None:
    """done/applied: loud; failed or no line: said plainly."""
    for state, loud in (("done", True), ("applied", True), ("failed", False), (None, False)):
        source = "ledger" if state == "applied" else "journal"
        asked = Asked(row(2, 500).item, JournalView(source, state, 9 if loud else None))
        judged = judge_bag([asked], [], bag(), "USD")[0]
        assert (judged.audit, judged.loud) == ("missing", loud)
        assert ("SAYS SUCCEEDED" in judged.detail) is loud


def test_money_is_written_in_the_currency_minor_unit() -> None:
    """Two decimals for USD, none for JPY; negative amounts keep their sign."""
    assert format_money(123456, "USD") == "USD 1,234.56"
    assert format_money(1500, "JPY") == "JPY 1,500"
    assert format_money(-5, "EUR") == "EUR -0.05"


def test_whole_bag_row_beside_failed_attempts_is_as_asked_never_missing() -> None:
    """A whole-bag refund of the bag's 5000 beside a FAILED attempt of 300 made before
    it, and another FAILED after it: neither moved money, so the 5000 is what was left
    (it was read as "missing" when dead records counted, or any later record did)."""
    whole = [row(2, None)]
    refunds = [rec(1, 300, status="FAILED"), rec(2, 5000), rec(3, 200, status="CANCELED")]
    judged = judge_bag(whole, refunds, bag("COMPLETED"), "USD")
    assert [(r.audit, r.refund_ids) for r in judged] == [("as_asked", (2,))]
    # A later refund that moved money (the bag refunded past its total): never
    # "missing"; the 5000 that emptied the bag is the row's, the later one extra.
    twice = judge_bag(whole, [rec(2, 5000), rec(3, 5000)], bag("REFUNDED"), "USD")
    assert [(r.audit, r.refund_ids, r.money) for r in twice] == [("extra", (2, 3), 5000)]


def test_sku_row_beside_a_record_without_lines_is_a_mismatch_that_says_so() -> None:
    """A row of SKU lines (Violet prices them) and a record that lists no lines (every
    field of a record is optional): it may be the row's refund, so never "missing"."""
    lines = row(2, None, skus=[SkuRefund(order_sku_id=10, quantity_refunded=1)])
    judged = judge_bag([lines], [rec(1, 700)], bag(), "USD")
    assert judged[0].audit == "mismatch"
    assert judged[0].refund_ids == (1,)
    assert "the record lists none" in judged[0].detail
    assert "cannot be told" in judged[0].detail
    # Lines of other SKUs are another refund: missing, the record asked by no row.
    other = rec(1, 700, skus=[{"order_sku_id": 11, "quantity_refunded": 1}])
    assert [r.audit for r in judge_bag([lines], [other], bag(), "USD")] == ["missing"]


def test_amount_with_shipping_recorded_as_one_total_is_a_mismatch_that_says_so() -> None:
    """amount_refunded 1000 with shipping 500, recorded as 1500 (or as the 500 of the
    items alone): Violet does not say which reading is right, never "missing"."""
    from violet_async import ShippingRefund

    asked = row(2, 1000, shipping=ShippingRefund(amount=500))
    for recorded in (1500, 500):
        judged = judge_bag([asked], [rec(1, recorded)], bag(), "USD")
        assert (judged[0].audit, judged[0].refund_ids) == ("mismatch", (1,))
        assert "may be in or out of the record's amount" in judged[0].detail
    assert [r.audit for r in judge_bag([asked], [rec(1, 1000)], bag(), "USD")] == ["as_asked"]
    # Without shipping asked, 1500 is another amount: missing.
    assert [r.audit for r in judge_bag([row(2, 1000)], [rec(1, 1500)], bag(), "USD")] == ["missing"]
