"""Which refund on a bag, if any, an ask made: the matching rule of README's "Never
refund twice", as pure functions over what a read-back saw."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Container, Sequence
from datetime import datetime

from ._ask import PendingRefund, Settings
from .models import (
    BagStatus,
    CancelBagRequest,
    OrderBag,
    OrderRefund,
    RefundBagRequest,
    RefundedSku,
    RefundStatus,
    SkuRefund,
)

__all__ = ["Verdict", "content", "effect_visible", "match", "needs_bag"]


class Verdict(enum.Enum):
    MATCH = "match"
    MISS = "miss"
    MANY = "many"
    NEAR = "near"
    UNDATED = "undated"
    EFFECT_WITHOUT_REFUND = "effect_without_refund"


#: Statuses of a refund that moved no money (another attempt's failure).
_DEAD = frozenset({RefundStatus.FAILED, RefundStatus.CANCELED})


def needs_bag(ask: PendingRefund) -> bool:
    """A cancel, or a whole-bag refund, can only be matched with the bag's status."""
    if ask.kind == "cancel":
        return True
    request = ask.request
    return (
        isinstance(request, RefundBagRequest)
        and request.amount_refunded is None
        and request.skus is None
    )


def _strip(text: str | None) -> str | None:
    return text.strip() if text is not None else None


def _sku_totals(lines: Sequence[SkuRefund] | Sequence[RefundedSku]) -> Counter[int | None]:
    # Units per order SKU: a platform may list 2 units of a SKU as two 1-unit lines.
    totals: Counter[int | None] = Counter()
    for line in lines:
        totals[line.order_sku_id] += line.quantity_refunded or 0
    return totals


def content(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> Verdict:
    """Does ``refund`` carry what was asked? MATCH, NEAR (close, not the same: a person
    should look) or MISS (another refund). Reasons are compared trimmed (Violet may store
    ``reason.strip()``); a FAILED or CANCELED refund that matches is only NEAR: another
    attempt's failure must never be reported as this ask's outcome."""
    request = ask.request
    near = bool(_strip(request.reason)) and (
        refund.reason is not None and _strip(refund.reason) != _strip(request.reason)
    )
    if refund.status in _DEAD:
        near = True
    if isinstance(request, CancelBagRequest):
        if bag is None or bag.status is not BagStatus.CANCELED:
            return Verdict.MISS
        # A cancel refunds what was left on the bag: another amount is some other
        # refund (or a rule we do not know), for a person to look at.
        if not _is_the_rest(refund, refunds, bag):
            near = True
        return Verdict.NEAR if near else Verdict.MATCH
    if request.amount_refunded is not None:
        if refund.amount is None:
            near = True  # a record without its amount may be ours: never a miss
        elif refund.amount != request.amount_refunded:
            return Verdict.MISS
    elif request.skus is None:
        # A whole-bag refund: the bag must read REFUNDED, and this refund must be what
        # was left on it before it.
        if bag is None or bag.status is not BagStatus.REFUNDED:
            return Verdict.MISS
        if not _is_the_rest(refund, refunds, bag):
            near = True
    if request.skus is not None:
        asked, got = _sku_totals(request.skus), _sku_totals(refund.skus)
        if asked != got:
            if request.amount_refunded is None and not set(asked) & set(got):
                return Verdict.MISS  # other SKUs, and no amount to tie it to ours
            near = True
    shipped = refund.shipping.amount if refund.shipping is not None else None
    if request.shipping is not None and shipped is not None and shipped != request.shipping.amount:
        near = True
    return Verdict.NEAR if near else Verdict.MATCH


def _is_the_rest(refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag) -> bool:
    """``refund`` closed the bag (a whole-bag refund, a cancel): nothing was refunded
    after it, and it refunded what the refunds before it left. Refund ids are taken to
    grow with time; where they do not, this says no, and a person looks."""
    if refund.id is None or refund.amount is None or bag.total is None:
        return False
    if any(r.id is not None and r.id > refund.id for r in refunds):
        return False  # refunded again after it: it did not close the bag
    earlier = [r.amount for r in refunds if r.id is not None and r.id < refund.id]
    if any(amount is None for amount in earlier):
        return False  # an earlier record without its amount: the rest is unknown
    return refund.amount == bag.total - sum(a for a in earlier if a is not None)


def _timestamp(when: datetime) -> float | None:
    """Unix time of an aware datetime; None for a naive one (server local, unknown)."""
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        return None
    return when.timestamp()


#: The widest a wrongly labelled offset can shift a date (UTC-12 to UTC+14): a refund
#: dated earlier than this send by less than that may be this send's own.
WRONG_OFFSET_SPAN = 14 * 3600.0


def match(
    ask: PendingRefund,
    refunds: Sequence[OrderRefund],
    bag: OrderBag | None,
    known: Container[int],
    settings: Settings,
) -> tuple[Verdict, tuple[OrderRefund, ...]]:
    """Which refund on the bag, if any, this ask made.

    A refund is a candidate when it is on this bag, was not already handed to a caller
    (``known``), is not in the baseline when there is one, and was created no earlier
    than the first send by Violet's clock (estimated from ``Date`` headers), less a
    tolerance. A date that rules a matching refund out by less than a day's worth of
    time zones (a wrongly labelled offset), a date without an offset, or no date, can
    rule it neither in nor out: without a baseline the verdict is then UNDATED (a
    person looks); with one, such a refund new since the baseline is a candidate.
    """
    offset_known = ask.server_offset is not None and not ask.clock_unsure
    tolerance = settings.date_tolerance if offset_known else settings.clock_skew
    sent = ask.first_sent_at
    earliest = None if sent is None else sent + (ask.server_offset or 0.0) - tolerance
    exact: list[OrderRefund] = []
    near: list[OrderRefund] = []
    undated: list[OrderRefund] = []
    for refund in refunds:
        if refund.bag_id is not None and refund.bag_id != ask.bag_id:
            continue
        if refund.id is not None and (refund.id in known or refund.id in ask.others):
            continue
        if ask.baseline is not None and refund.id is not None and refund.id in ask.baseline:
            continue
        created = None if refund.date_created is None else _timestamp(refund.date_created)
        if created is not None and earliest is not None and created < earliest:
            if created < earliest - WRONG_OFFSET_SPAN:
                continue  # made long before this ask was first sent
            dated = False  # earlier than the send, or ours under a wrong offset
        elif created is None or refund.id is None:
            dated = ask.baseline is not None  # new since the baseline: a candidate
        else:
            dated = True
        verdict = content(ask, refund, refunds, bag)
        if verdict is Verdict.MISS:
            continue
        if not dated:
            (undated if verdict is Verdict.MATCH else near).append(refund)
        elif verdict is Verdict.MATCH:
            exact.append(refund)
        else:
            near.append(refund)
    if len(exact) > 1:
        return Verdict.MANY, tuple(exact)
    if undated:
        return Verdict.UNDATED, tuple(exact + undated)
    if exact:
        return Verdict.MATCH, tuple(exact)
    if near:
        return Verdict.NEAR, tuple(near)
    if bag is not None and effect_visible(ask, bag):
        return Verdict.EFFECT_WITHOUT_REFUND, ()
    return Verdict.MISS, ()


def effect_visible(ask: PendingRefund, bag: OrderBag) -> bool:
    """The bag's state already shows what this ask would do (a re-send would be refused
    or, worse, apply): CANCELED for a cancel, REFUNDED for a whole-bag refund."""
    if ask.kind == "cancel":
        return bag.status is BagStatus.CANCELED
    return needs_bag(ask) and bag.status is BagStatus.REFUNDED
