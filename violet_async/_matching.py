"""Which refund on a bag, if any, an ask made: the matching rule of README's "Never
refund twice", as pure functions over what a read-back saw."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Container, Sequence
from datetime import datetime

from ._ask import PendingRefund, Settings
from .models import BagStatus, CancelBagRequest, OrderBag, OrderRefund, RefundBagRequest

__all__ = ["Verdict", "content", "effect_visible", "match", "needs_bag"]


class Verdict(enum.Enum):
    MATCH = "match"
    MISS = "miss"
    MANY = "many"
    NEAR = "near"
    UNDATED = "undated"
    EFFECT_WITHOUT_REFUND = "effect_without_refund"


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


def content(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> Verdict:
    """Does ``refund`` carry what was asked? MATCH, NEAR (close, not the same) or MISS."""
    request = ask.request
    near = False
    if (
        _strip(request.reason)
        and refund.reason is not None
        and _strip(refund.reason) != _strip(request.reason)
    ):
        near = True
    if isinstance(request, CancelBagRequest):
        if bag is None or bag.status is not BagStatus.CANCELED:
            return Verdict.MISS
        return Verdict.NEAR if near else Verdict.MATCH
    if request.amount_refunded is not None:
        if refund.amount != request.amount_refunded:
            return Verdict.MISS
    elif request.skus is None:
        # A whole-bag refund: the bag must read REFUNDED, and this refund must be what
        # was left on it before it.
        if bag is None or bag.status is not BagStatus.REFUNDED:
            return Verdict.MISS
        others = sum(r.amount for r in refunds if r is not refund and r.id != refund.id)
        if bag.total is None or refund.amount != bag.total - others:
            near = True
    if request.skus is not None:
        if not refund.skus:
            near = True
        else:
            asked = Counter((s.order_sku_id, s.quantity_refunded) for s in request.skus)
            got = Counter((s.order_sku_id, s.quantity_refunded) for s in refund.skus)
            if asked != got:
                if request.amount_refunded is None:
                    return Verdict.MISS
                near = True
    shipped = refund.shipping.amount if refund.shipping is not None else None
    if request.shipping is not None and shipped is not None and shipped != request.shipping.amount:
        near = True
    return Verdict.NEAR if near else Verdict.MATCH


def _timestamp(when: datetime) -> float | None:
    """Unix time of an aware datetime; None for a naive one (server local, unknown)."""
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        return None
    return when.timestamp()


def match(
    ask: PendingRefund,
    refunds: Sequence[OrderRefund],
    bag: OrderBag | None,
    known: Container[int],
    settings: Settings,
) -> tuple[Verdict, tuple[OrderRefund, ...]]:
    """Which refund on the bag, if any, this ask made.

    A refund is a candidate when it is on this bag, was not already handed to a caller
    (``known``), and is new: not in the baseline when there is one; otherwise created no
    earlier than the first send (by Violet's clock, estimated from ``Date`` headers,
    less a tolerance). A date without an offset, or none, can neither rule a refund in
    nor out: if only such a date separates a refund from ours, the verdict is UNDATED.
    """
    sent = ask.first_sent_at if ask.baseline is None else None
    tolerance = settings.date_tolerance if ask.server_offset is not None else settings.clock_skew
    earliest = None if sent is None else sent + (ask.server_offset or 0.0) - tolerance
    exact: list[OrderRefund] = []
    near: list[OrderRefund] = []
    undated: list[OrderRefund] = []
    for refund in refunds:
        if refund.bag_id is not None and refund.bag_id != ask.bag_id:
            continue
        if refund.id is not None and refund.id in known:
            continue
        if ask.baseline is not None:
            if refund.id is not None and refund.id in ask.baseline:
                continue
            dated: bool | None = True
        elif refund.date_created is None or refund.id is None:
            dated = None
        else:
            created = _timestamp(refund.date_created)
            if created is None:
                dated = None
            elif earliest is not None and created < earliest:
                continue  # made before this ask was first sent
            else:
                dated = True
        verdict = content(ask, refund, refunds, bag)
        if verdict is Verdict.MISS:
            continue
        if dated is None:
            undated.append(refund)
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
