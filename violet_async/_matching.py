"""Which refund on a bag, if any, an ask made: the matching rule of README's "Never
refund twice", as pure functions over what a read-back saw."""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Container, Sequence
from datetime import datetime

import attrs

from ._ask import IDLESS_EARLIER, PendingRefund, Settings
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

__all__ = [
    "Reading",
    "Verdict",
    "cannot_tell",
    "content",
    "effect_visible",
    "judge",
    "match",
    "needs_bag",
    "no_baseline_window",
    "on_bag",
    "on_order",
    "places_nothing",
    "send_offsets",
]


class Verdict(enum.Enum):
    MATCH = "match"
    MISS = "miss"
    MANY = "many"
    NEAR = "near"
    UNDATED = "undated"
    OWNED = "owned"
    """Only refunds already handed to other calls carry what was asked: never claimed,
    never evidence of absence."""
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


def on_bag(refund: OrderRefund, bag_id: int) -> bool:
    """Whether ``refund`` may be a refund of bag ``bag_id``: it names that bag, or none.
    A ``bag_id`` that is no id (0, or below: a default a backend writes for a field it
    never set) names none: read as another bag's, an ask's own refund listed that way
    was proven absent and sent again (review 18)."""
    named = refund.bag_id
    return named is None or named <= 0 or named == bag_id


def on_order(refund: OrderRefund, order_id: int) -> bool:
    """Whether ``refund`` may be a refund of order ``order_id``: it names that order,
    or none (0 or below: a default, as for :func:`on_bag`)."""
    named = refund.order_id
    return named is None or named <= 0 or named == order_id


def _strip(text: str | None) -> str | None:
    return text.strip() if text is not None else None


def _sku_totals(lines: Sequence[SkuRefund] | Sequence[RefundedSku]) -> Counter[int | None]:
    # Units per order SKU: a platform may list 2 units of a SKU as two 1-unit lines.
    # An order SKU id of 0 or below is none (a backend's default for an id it never
    # set): read as another SKU, an ask's own refund was proven absent and sent
    # again four times (review 22).
    totals: Counter[int | None] = Counter()
    for line in lines:
        sku = line.order_sku_id
        totals[sku if sku is None or sku > 0 else None] += line.quantity_refunded or 0
    return totals


def cannot_tell(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> bool:
    """Whether ``refund`` (one that moved money) may be this ask's with nothing to tell
    either way: a whole-bag refund or cancel whose bag, or share of it, cannot be read;
    an amount asked for and a record without one; SKU lines asked for and a record that
    lists none; an amount asked for with shipping and a record whose amount is that
    amount with the shipping in or out (Violet does not say which). The guard read
    never sends past it."""
    if refund.status in _DEAD:
        return False
    return _compare(ask, refund, refunds, bag) == (Verdict.NEAR, True)


def content(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> Verdict:
    """Does ``refund`` carry what was asked? MATCH, NEAR (close, not the same, or what
    it carries cannot be told: a person should look) or MISS (another refund). Reasons
    are compared trimmed (Violet may store ``reason.strip()``); a FAILED or CANCELED
    refund that matches is only NEAR: another attempt's failure must never be reported
    as this ask's outcome.

    A cancel or a whole-bag refund is the refund of what was left on the bag, whatever
    the bag's status says: the commerce platform moves that status minutes later, so a
    status that has not moved yet rules nothing out. A status that moved the other way
    (REFUNDED for a cancel, CANCELED for a whole-bag refund) makes it NEAR.

    MISS only where the record shows another refund. A record that leaves out what
    would tell (its amount; its SKU lines, for a refund of lines Violet prices) or
    whose amount may or may not carry the shipping asked for (Violet's pages do not
    say whether a record's ``amount`` includes it) is NEAR: it may be ours."""
    return _compare(ask, refund, refunds, bag)[0]


def _shipping_folded(request: RefundBagRequest, refund: OrderRefund) -> bool:
    """The record's amount is the asked amount with the asked (or recorded) shipping
    added, or taken out: one refund, read the other way round. Violet's example asks
    ``amount_refunded`` 1000 with ``shipping.amount`` 500 and does not say whether the
    record's ``amount`` then reads 1000, 1500 or 500. The same holds for the tax a
    record names (``tax_amount``, and its shipping's): its ``amount`` may carry it."""
    asked = request.amount_refunded
    if asked is None or refund.amount is None:
        return False
    shipped = {0}
    if request.shipping is not None:
        shipped.add(request.shipping.amount)
    if refund.shipping is not None and refund.shipping.amount is not None:
        shipped.add(refund.shipping.amount)
    taxed = {0, _tax_extra(refund), _all_extra(refund) - _shipping_extra(refund)}
    return any(
        (s or t) and refund.amount in (asked + s + t, asked - s - t) for s in shipped for t in taxed
    )


def _compare(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> tuple[Verdict, bool]:
    """:func:`content`'s verdict, and whether a NEAR is "cannot be told" (the record
    leaves out, or leaves open, what would tell) rather than "close, not the same"."""
    request = ask.request
    if (
        isinstance(request, RefundBagRequest)
        and request.amount_refunded is not None
        and refund.amount is not None
        and refund.amount < 0
    ):
        # A negative amount (a ledger's sign for money going out; Violet's pages give
        # it none): read with its sign taken off, it may be ours, never told for sure
        # (review 20: read as another amount, the ask's own refund was proven absent
        # and sent again). Taken off, it may still show another refund: a miss.
        flipped = _compare(ask, attrs.evolve(refund, amount=-refund.amount), refunds, bag)
        return flipped if flipped[0] is Verdict.MISS else (Verdict.NEAR, True)
    near = bool(_strip(request.reason)) and (
        refund.reason is not None and _strip(refund.reason) != _strip(request.reason)
    )
    if refund.status in _DEAD:
        near = True
    unsure = False
    whole = isinstance(request, CancelBagRequest) or (
        request.amount_refunded is None and request.skus is None
    )
    if whole:
        rest = None if bag is None else _is_the_rest(refund, refunds, bag, ask.order_id)
        if bag is None or rest is None:
            return Verdict.NEAR, True  # what was left cannot be told: a person looks
        if not rest:
            if _shipping_only(request, refund):
                return Verdict.NEAR, True
            return (Verdict.NEAR if effect_visible(ask, bag) else Verdict.MISS), False
        other_effect = (
            BagStatus.REFUNDED if isinstance(request, CancelBagRequest) else BagStatus.CANCELED
        )
        if bag.status is other_effect:
            near = True
    if isinstance(request, CancelBagRequest):
        return (Verdict.NEAR if near else Verdict.MATCH), False
    if request.amount_refunded is not None:
        if (
            refund.amount is None
            or refund.amount == 0
            or (bag is not None and _other_currency(refund, bag))
        ):
            # A record without its amount, with 0 for it (a backend's default for an
            # amount not filled in yet: read as a refund of nothing, an ask's own
            # refund was proven absent and sent again four times, review 22; an ask
            # never asks for 0), or with an amount in another currency than the bag's,
            # may be ours: never a miss.
            unsure = True
        elif refund.amount != request.amount_refunded:
            wanted = request.amount_refunded
            if not (
                _shipping_folded(request, refund)
                or _partly(refund, wanted)
                or _scaled(refund.amount, wanted)
            ):
                return Verdict.MISS, False
            # The shipping or tax in or out of the record's amount, a part of it, or
            # it in other minor units.
            unsure = True
    if request.skus is not None:
        asked, got = _sku_totals(request.skus), _sku_totals(refund.skus)
        if not got or None in got:
            # No lines listed, or a line without its order SKU (every field of a
            # record is optional): they may be ours.
            unsure = True
        elif asked != got:
            if request.amount_refunded is None and not set(asked) & set(got):
                return Verdict.MISS, False  # other SKUs, and no amount to tie it to ours
            near = True
    shipped = refund.shipping.amount if refund.shipping is not None else None
    if request.shipping is not None and shipped is not None and shipped != request.shipping.amount:
        near = True
    if unsure:
        return Verdict.NEAR, True
    return (Verdict.NEAR if near else Verdict.MATCH), False


def _other_currency(refund: OrderRefund, bag: OrderBag) -> bool:
    """The record names another currency than the bag's. Violet's ``refund_currency``
    is "set for this refund by the external ecom platform", and a bag's base currency
    may differ from the merchant platform's (``currency_exchange_rate``); its pages do
    not say which currency a record's ``amount`` is in. Such an amount cannot be held
    against the bag's total or an amount asked: it may be ours, never a miss."""
    theirs, ours = refund.refund_currency, bag.currency
    if not theirs or not ours:
        return False
    return theirs.strip().upper() != ours.strip().upper()


def _is_the_rest(
    refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag, order_id: int
) -> bool | None:
    """``refund`` closed the bag (a whole-bag refund, a cancel): it refunded what the
    refunds before it left. Only refunds that moved money count (a FAILED or CANCELED
    attempt left the bag as it was), and only this bag's (a list may carry another
    bag's records) of order ``order_id`` (a record naming another order under the bag's
    id moved none of its money by its own word; counted, the ask's own whole-bag refund
    was "not what was left" and reported failed: simulator seed 1269007; counted or
    not, a refund that closes the bag one way of reading is never a miss). Refund ids
    are taken to grow with time.

    False: it is not what was left. None: it cannot be told (no id, no total, an
    earlier amount missing, an amount in another currency than the bag's), or it was
    what was left and the bag was refunded again
    after it (a double refund, or ids that do not grow with time): a person looks,
    never a miss."""
    if refund.id is None or refund.amount is None or bag.total is None or bag.total <= 0:
        # A total of 0 or less is none given (a backend's default for a total never
        # filled in): read as the bag's, a whole-bag refund that applied was "not what
        # was left" and sent again (review 22).
        return None
    others = [
        r
        for r in refunds
        if r.id is not None and r.id != refund.id and r.status not in _DEAD and on_bag(r, bag.id)
    ]
    foreign = [r for r in others if not on_order(r, order_id)]
    if foreign:
        others = [r for r in others if on_order(r, order_id)]
    before = [r for r in others if r.id is not None and r.id < refund.id]
    if any(_other_currency(r, bag) for r in (refund, *before)):
        return None  # an amount in another currency than the bag's total's
    earlier = [r.amount for r in before]
    if any(amount is None or amount <= 0 for amount in (refund.amount, *earlier)):
        # An earlier record without its amount, a negative one (a ledger's sign for
        # money going out), or 0 (an amount not filled in: review 22): the rest is
        # unknown.
        return None
    if refund.amount != bag.total - sum(a for a in earlier if a is not None):
        # Violet's pages do not say whether a record's ``amount`` carries its
        # shipping and tax, nor whether a whole bag's refund does (a platform may
        # refund the items alone): read every record one of those ways, the refund
        # may still be exactly what was left. It cannot be told then: never a miss.
        # So may a refund that failed after it (it was counted as moving money when
        # this one was made).
        failed = [
            r
            for r in refunds
            if r.id is not None
            and r.id < refund.id
            and r.status in _DEAD
            and r.amount is not None
            and on_bag(r, bag.id)
        ]
        readings = [before]
        if failed:
            readings.append(before + failed)
        if foreign:
            readings.append(before + [r for r in foreign if r.id is not None and r.id < refund.id])
        named_bag = [r for r in before if r.bag_id is not None and r.bag_id > 0]
        if len(named_bag) < len(before):
            # A record naming no bag may be another bag's (a list may carry them).
            readings.append(named_bag)
        for counted in readings:
            for base in _bag_bases(bag):
                for extra in _EXTRAS:
                    if extra(refund) + refund.amount == base - sum(
                        (r.amount or 0) + extra(r) for r in counted
                    ):
                        return None
        rest = bag.total - sum(a for a in earlier if a is not None)
        if _partly(refund, rest) or _scaled(refund.amount, rest):
            return None
        return False
    if any(r.id is not None and r.id > refund.id for r in others):
        return None  # refunded again after it: it did not close the bag, or ids lie
    return True


def _shipping_only(request: RefundBagRequest | CancelBagRequest, refund: OrderRefund) -> bool:
    """``request`` names shipping and no amount or lines, and ``refund`` refunded that
    shipping alone. By the letter of Violet's page such a request refunds the whole
    bag (no amount, no SKUs) and its shipping; a platform may refund the shipping only,
    and its record is then this ask's (review 18: proven absent, sent four times)."""
    if not isinstance(request, RefundBagRequest) or request.shipping is None:
        return False
    asked = request.shipping.amount
    shipped = refund.shipping.amount if refund.shipping is not None else None
    return refund.amount in (0, asked) or shipped == asked


def _scaled(amount: int, asked: int) -> bool:
    """``amount`` is ``asked`` in other minor units (10, 100 or 1000 times it, or that
    part of it): a currency without cents (JPY) or with three decimals (KWD) recorded
    as if it had two. It may be this ask's (review 18: proven absent, sent again)."""
    if amount <= 0 or asked <= 0 or amount == asked:
        return False
    big, small = max(amount, asked), min(amount, asked)
    return any(big == small * factor for factor in (10, 100, 1000))


def _partly(refund: OrderRefund, asked: int) -> bool:
    """A refund Violet marks PARTIALLY_COMPLETED for less than ``asked``: its
    ``amount`` may be the part that went through (the pages do not say), so it may be
    the refund of ``asked``."""
    return (
        refund.status is RefundStatus.PARTIALLY_COMPLETED
        and refund.amount is not None
        and refund.amount < asked
    )


def _bag_bases(bag: OrderBag) -> list[int]:
    """What refunding the whole bag may come to: its total, or its items alone, with
    or without their tax and shipping."""
    bases = [] if bag.total is None else [bag.total]
    items = bag.sub_total
    if items is not None:
        tax, shipping = bag.tax_total or 0, bag.shipping_total or 0
        bases += [items, items + tax, items + shipping, items + tax + shipping]
    return bases


def _no_extra(refund: OrderRefund) -> int:
    return 0


def _shipping_extra(refund: OrderRefund) -> int:
    shipping = refund.shipping
    return (shipping.amount or 0) if shipping is not None else 0


def _tax_extra(refund: OrderRefund) -> int:
    return refund.tax_amount or 0


def _all_extra(refund: OrderRefund) -> int:
    shipping = refund.shipping
    shipped_tax = (shipping.tax_amount or 0) if shipping is not None else 0
    return _shipping_extra(refund) + _tax_extra(refund) + shipped_tax


#: What a record may have refunded beside its ``amount`` (Violet's pages do not say
#: whether ``amount`` carries the shipping and tax the record names), each read the
#: same way for every record of a bag.
_EXTRAS: tuple[Callable[[OrderRefund], int], ...] = (
    _no_extra,
    _shipping_extra,
    _tax_extra,
    _all_extra,
)


def unix_time(when: datetime | None) -> float | None:
    """Unix time of an aware datetime; None for none, or a naive one (server local,
    unknown)."""
    if when is None or when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        return None
    return when.timestamp()


#: The widest a wrongly labelled offset can shift a date (UTC-12 to UTC+14): a refund
#: dated earlier than this send by less than that may be this send's own.
WRONG_OFFSET_SPAN = 14 * 3600.0

#: A ``Date`` header further than this from this machine's clock is not trusted alone
#: (a CDN or load balancer may stamp its own, hours off; or this machine's clock is):
#: a date must then fit both readings of when the ask was sent.
TRUSTED_OFFSET = 900.0


def send_offsets(ask: PendingRefund, settings: Settings) -> tuple[float, float, float, bool]:
    """The lowest and highest offset of Violet's clock over this record's times, the
    tolerance around them, and whether the clock is sure.

    The ``Date`` headers' offset alone when they agree with each other and, within
    minutes, with the clock the ask's times were taken by (this machine's clock as it
    was before any step the ask saw); otherwise every reading between them and this
    machine's clock, before and after a step (unsure; without a ``Date``, this machine's
    clock before and after a step). A ``Date`` that agrees only with
    the clock after a step of hours is not trusted: a step that put the clock right
    cannot be told from a CDN's wrong ``Date`` and a step gone wrong the same way
    (simulator seed 605311)."""
    offset = ask.server_offset
    local = (0.0, -ask.stepped)
    if offset is None:
        # No Date: this machine's clock, as it is and as it was before a step (seed
        # 614937: a step of 15 h put our refund "15 h before the send").
        return min(local), max(local), settings.clock_skew, False
    if ask.offsets is None and abs(offset + ask.stepped) <= TRUSTED_OFFSET:
        if ask.clock_unsure:
            return offset, offset, settings.clock_skew, False
        return offset, offset, settings.date_tolerance, True
    readings = (offset, *local, *(ask.offsets or ()))
    return min(readings), max(readings), settings.clock_skew, False


#: A ``Date`` offset within this of this machine's clock (as it is, or as it was
#: before a step) is taken as a reading of Violet's own clock for the latest date a
#: refund can carry (a machine's clock, or Violet's, a few minutes off). Further off,
#: either clock may be the one that dates the refunds (a CDN or load balancer stamping
#: its own ``Date``, or this machine's clock off), and a date must be no later than
#: the read by both. The earliest date is never the ``Date`` header's alone: see
#: :func:`no_baseline_window`. (Trusting it alone up to 15 minutes, as the baseline
#: rule's ``TRUSTED_OFFSET`` does for review, claimed a refund another system made 5
#: minutes before the send when a ``Date`` header was 10 minutes behind; trusting it
#: alone up to 3 minutes claimed one made 100 s before the send when the header was
#: 170 s behind.)
TRUSTED_DATE = 180.0


def _readings(ask: PendingRefund) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The record's readings of Violet's clock against this machine's: this machine's
    clock as it is, and as it was before a step the ask saw (offset ``-stepped``); and
    every offset the ``Date`` headers gave (none without a ``Date``)."""
    local = (0.0,) if not ask.stepped else (0.0, -ask.stepped)
    offset = ask.server_offset
    return local, () if offset is None else (offset, *(ask.offsets or ()))


def no_baseline_window(
    ask: PendingRefund,
    settings: Settings,
    read_server_time: float | None = None,
    read_at: float | None = None,
) -> tuple[float, float, float | None]:
    """Without a baseline: how a refund's date must sit for it to be this ask's, as
    offsets from the first send (``floor``: no earlier than ``sent + floor``; ``gone``:
    a refund ending before ``sent + gone`` was made long before the send under every
    reading) and the latest date a refund can carry (``ceiling``: Violet's clock at
    the read; None: not known).

    Violet's clock is read two ways: by the ``Date`` headers (every offset they gave,
    when they disagreed; each within ``date_tolerance``, or ``clock_skew`` for the
    earlier readings of a record moved onto this clock from another, never for the
    latest, this process's own; a record's
    unsure times never lower it) and by this machine's clock (as it is,
    or as it was before a step the ask saw; within ``date_tolerance``). A date must
    place the refund after the send by every reading: a ``Date`` header behind the
    clock that dates refunds (a CDN or load balancer stamping its own) would otherwise
    lower the floor below the send, and another system's refund made that long before
    it would pass for this ask's (a false success). This machine's clock, held to
    ``date_tolerance``, is what keeps the floor from going below the send; the
    ``Date`` headers only ever raise it. Violet's whole clock behind this machine's looks the same
    from here, so our own refund is then left for review, never claimed; Violet's
    clock ahead costs nothing (the ``Date`` floor is the higher). When the ``Date``
    agrees with one reading of this machine's clock within :data:`TRUSTED_DATE`, a
    reading hours off (the other side of a step of hours) is not one. With no ``Date``
    at all, this machine's clock is all there is, within ``clock_skew``.

    For the latest date, a ``Date`` offset within :data:`TRUSTED_DATE` of this
    machine's clock is taken alone (within ``date_tolerance``, or ``clock_skew`` when
    the headers disagreed or the record's times are unsure); otherwise a date must be
    no later than the read by each reading.

    The read's own ``Date`` always bounds the dates: a refund dated after Violet's
    own clock at the read (by more than the tolerance) carries a date that cannot be
    right (a local time labelled UTC east of it, a clock that dates refunds minutes
    fast), so it cannot place the refund after the send either."""
    skew = settings.clock_skew
    local, dates = _readings(ask)
    offset = ask.server_offset
    precise = offset is not None and ask.offsets is None and not ask.clock_unsure
    tolerance = settings.date_tolerance if precise else skew
    # The floor, a claim's bar, is not lowered by a record's unsure times (a step
    # measured while the ask ran, another process's record): with one reading of
    # Violet's clock (the Date headers agree) the send is placed by it within
    # ``date_tolerance`` all the same; a refund dated below that is for review, never
    # claimed. Lowered to ``clock_skew``, another system's refund made 10 s before a
    # send was claimed after a step of 30 s moved the record (simulator seeds 931646,
    # 941160). Nor by Date headers of this clock that disagree: each of their readings
    # places the send within ``date_tolerance`` (held to ``clock_skew`` below the
    # earlier ones, when the latest was the one that jumped, an answer's ``Date`` 120 s
    # behind Violet's 264 s ahead, another system's refund made 8 s before a re-send
    # passed by 52 s: simulator seed 973571). Only a record moved onto this clock from
    # another (``offsets_moved``) keeps ``clock_skew`` below its earlier readings: one
    # of them is its times as they were, which no Date header gave.
    raised = skew if ask.offsets is not None and ask.offsets_moved else settings.date_tolerance
    # "Made long before the send" needs a reading of Violet's own clock (a ``Date``):
    # this machine's wall clock alone may be hours off with nothing here to tell (a
    # step before this process was made, and before the process that wrote the
    # record). Without one, a refund carrying what was asked, dated hours before the
    # send by that clock alone, is for review, never proof of absence (a process made
    # after a step of 18 h took its own refund behind a 504 for one made long before,
    # proved it absent and sent it again: the rest of simulator seed 1079285).
    gone = min((*dates, *local)) - skew - WRONG_OFFSET_SPAN if dates else -math.inf
    if (
        offset is not None
        and ask.offsets is None
        and any(abs(offset - h) <= TRUSTED_DATE for h in local)
    ):
        # The Date headers and this machine's clock (as it is, or as it was before a
        # step) agree within minutes: the Date bounds the latest date alone; the send
        # is placed by the latest of them (a reading hours off, the other side of a
        # step of hours, is not one).
        agreed = [h for h in local if abs(offset - h) <= TRUSTED_DATE]
        floor = max(offset - raised, max(agreed) - settings.date_tolerance)
        ceilings = [] if read_at is None else [read_at + offset + tolerance]
    else:
        mine = settings.date_tolerance if dates else skew
        # The latest reading is this process's own, on this clock (a record of another
        # clock is moved onto it by that reading): the send is placed by it within
        # ``date_tolerance``, however far earlier readings disagreed. Held only within
        # ``clock_skew`` of every reading, another system's refund made 10 s before a
        # re-send, Violet's clock 46 s ahead and one answer's ``Date`` 120 s behind, was
        # claimed by a resume after a step (review 21, simulator seed 961780).
        latest = () if offset is None else (offset - settings.date_tolerance,)
        floor = max((*latest, *(d - raised for d in dates), *(h - mine for h in local)))
        ceilings = [] if read_at is None else [read_at + h + skew for h in local]
        if read_at is not None:
            ceilings += [read_at + d + tolerance for d in dates]
    if read_server_time is not None:
        ceilings.append(read_server_time + tolerance)
    return floor, gone, min(ceilings) if ceilings else None


#: A date at exactly midnight UTC, or at midnight in the zone of its own offset
#: (``2026-12-07T00:00:00+09:00``), is taken to carry the day only (some platforms
#: store dates, not times): the refund was made some time in the 24 hours from it.
DAY = 86_400.0


#: Dates before this (2000-01-01T00:00:00Z) are no refund's: Violet's API is younger.
#: A record carries one when its backend never set the date and wrote its zero instead
#: (Unix time 0, ``1970-01-01T00:00:00Z``; a zero datetime, ``0001-01-01T00:00:00Z``;
#: -1). Taken as a date, it placed the refund "long before the send", and without a
#: baseline an ask's own refund listed that way was skipped as another's, proven
#: absent and sent again (review 22).
EARLIEST_DATE = 946_684_800.0


def placeholder_date(stamp: float | None) -> bool:
    """``stamp`` (Unix seconds) is a backend's stand-in for a date it never set."""
    return stamp is not None and stamp < EARLIEST_DATE


def date_span(refund: OrderRefund) -> tuple[float, float] | None:
    """The earliest and latest Unix time the refund's date allows, as written (None:
    no date, or one without an offset)."""
    when = refund.date_created
    if when is None:
        return None
    stamp = unix_time(when)
    if stamp is None:
        return None
    offset = when.utcoffset()
    local = stamp + (offset.total_seconds() if offset is not None else 0.0)
    if stamp % DAY == 0.0 or local % DAY == 0.0:
        # The day only, in UTC or in the date's own zone (review 38: a local midnight
        # hours before the send placed the ask's own refund there, older than the send:
        # proven absent and sent again, two refunds).
        return stamp, stamp + DAY
    return stamp, stamp


#: Every zone's offset is a whole number of quarter-hours (UTC-12 to UTC+14), so a
#: date at a whole quarter-hour, however it is written, may be a day only stored at
#: midnight in some zone and written in another (Violet writes its dates in UTC:
#: ``2026-12-06T15:00:00+0000`` is midnight of the 7th in +09:00).
QUARTER_HOUR = 900.0


def latest_moment(span: tuple[float, float]) -> float:
    """The latest moment a refund dated ``span`` (:func:`date_span`) may have been made:
    its day's end for a date at a whole quarter-hour, which may be a zone's midnight
    written in another zone (review 39: the ask's own refund behind a 500, dated at
    such a midnight more than 14 h before the send, was proven absent and sent again)."""
    early, late = span
    if late == early and early % QUARTER_HOUR == 0.0:
        return early + DAY
    return late


def _created(refund: OrderRefund) -> tuple[float, float] | None:
    """:func:`date_span`, None for a placeholder too (:func:`placeholder_date`): it
    places the refund nowhere."""
    span = date_span(refund)
    return None if span is None or placeholder_date(span[0]) else span


def places_nothing(refund: OrderRefund) -> bool:
    """The refund's date cannot place it at a moment: it has none, or one without a
    UTC offset, a placeholder (:func:`placeholder_date`), or the day only."""
    span = _created(refund)
    return span is None or span[1] > span[0]


class Reading:
    """What :func:`judge` made of one read-back."""

    __slots__ = ("doubt", "found", "other_currency", "seen", "verdict")

    def __init__(
        self,
        verdict: Verdict,
        found: tuple[OrderRefund, ...],
        seen: frozenset[int],
        doubt: str = "",
        other_currency: bool = False,
    ) -> None:
        self.verdict = verdict
        self.found = found
        self.seen = seen
        self.other_currency = other_currency
        """Read without the bag, a listed refund differs from this ask only in an
        amount it gives in a currency of its own (``refund_currency``): the bag's
        currency would tell whether that amount can be compared at all."""
        """Ids of every refund that could be this ask's, or that only another call's
        ownership kept from being so (the record remembers them)."""
        self.doubt = doubt
        """UNDATED: why the first such candidate cannot be taken for this ask's."""


def match(
    ask: PendingRefund,
    refunds: Sequence[OrderRefund],
    bag: OrderBag | None,
    known: Container[int],
    settings: Settings,
    *,
    read_server_time: float | None = None,
    read_at: float | None = None,
) -> tuple[Verdict, tuple[OrderRefund, ...]]:
    """:func:`judge`'s verdict and the refunds it names."""
    reading = judge(
        ask, refunds, bag, known, settings, read_server_time=read_server_time, read_at=read_at
    )
    return reading.verdict, reading.found


#: Why a date cannot place a refund after the send: the start of every such reason.
UNPLACED = "its date cannot place it after this request was sent"

#: Seconds past a send's ``settle_running`` within which a refund's date may still be
#: that send's (an attempt's own time, a platform stamping the refund minutes after
#: it processed it): later, by every reading of Violet's clock, it is not this ask's.
LATE_STAMP = 300.0


def latest_own(ask: PendingRefund, settings: Settings) -> float | None:
    """The latest date (Violet's clock, Unix seconds) a refund of this ask's sends can
    carry, by the latest reading of Violet's clock (None: its last send's time is not
    known). A send that is still running at Violet when its settle window ends is
    taken as never applying (a read then missing it proves it absent): a refund dated
    long after that is another's, whatever it carries (review 20: another system's
    identical refund made half an hour after a send that never applied was returned
    by a resume as the call's own)."""
    sent = ask.last_sent_at
    if sent is None:
        return None
    skew = settings.clock_skew
    local, dates = _readings(ask)
    mine = settings.date_tolerance if dates else skew
    latest: float = max((*(d + skew for d in dates), *(h + mine for h in local)))
    return sent + settings.settle_running + LATE_STAMP + latest


def _doubt(
    refund: OrderRefund,
    span: tuple[float, float] | None,
    sent: float | None,
    *,
    floor: float,
    ceiling: float | None,
    sure: bool,
    latest: float | None = None,
) -> str | None:
    """Why ``refund``, which carries what was asked, cannot be taken for this ask's
    (None: it can; its date places it after the first send by every reading of
    Violet's clock, and no later than this ask's sends can have applied: ``latest``,
    :func:`latest_own`). ``floor`` and ``ceiling``: :func:`no_baseline_window`'s."""
    if refund.status is RefundStatus.EXTERNAL:
        return "Violet marks it EXTERNAL: it was made on the merchant's platform, not by a request"
    if refund.id is None:
        return "it has no id: it cannot be looked up in a baseline, nor told from an older one"
    if span is None:
        if refund.date_created is None:
            return f"{UNPLACED} (it has no date)"
        if placeholder_date(unix_time(refund.date_created)):
            return f"{UNPLACED} (the date is a placeholder for one never set, before 2000)"
        return f"{UNPLACED} (the date has no offset: server-local time)"
    if sent is None:
        return f"{UNPLACED} (when this request was first sent is not known)"
    early, late = span
    if ceiling is not None and early > ceiling:
        return f"{UNPLACED} (the date is later than the read that listed it: a wrong offset)"
    if latest is not None and early > latest:
        return (
            "its date is later than this request's last send can have applied (its settle "
            "window long past): it may be another's, made since"
        )
    if early >= sent + floor:
        return None
    if late > early:
        return (
            f"{UNPLACED} (the date has the day only, midnight in UTC or in its own zone: "
            "before or after cannot be told)"
        )
    if sure:
        return (
            f"{UNPLACED} (the date is earlier than the send by this machine's clock or "
            "by the Date headers: a Date header behind the clock that dates refunds "
            "cannot be told from Violet's clock behind this machine's)"
        )
    return (
        f"{UNPLACED} (the date is earlier than the send by some reading of Violet's clock: "
        "Date headers that disagree or sit far from this machine's clock, no Date header, "
        "or a wall clock that stepped)"
    )


def judge(
    ask: PendingRefund,
    refunds: Sequence[OrderRefund],
    bag: OrderBag | None,
    known: Container[int],
    settings: Settings,
    *,
    read_server_time: float | None = None,
    read_at: float | None = None,
) -> Reading:
    """Which refund on the bag, if any, this ask made.

    A refund is a candidate when it is on this bag, carries what was asked
    (:func:`content`), and is not in the baseline when there is one. A candidate is
    claimed only when its date places it after the first send by every reading of
    Violet's clock (estimated from ``Date`` headers: :func:`send_offsets`), less a
    tolerance, and no later than the last send can have applied (:func:`latest_own`):
    a precise date with an offset, and an id. One Violet marks ``EXTERNAL``
    (made on the merchant's platform) is never claimed, whatever its date.

    A baseline only ever excludes. A refund missing from it is not thereby new: the
    baseline read may have come from a replica behind, which does not list another
    system's refund made shortly before (or one made between the read and the send).
    So a candidate whose date cannot place it after the send is UNDATED, with or
    without a baseline: a day-precision date whose day includes the send, a date
    without an offset, no date, a date earlier than the send by some reading of the
    clock, a date later than the read by some reading (it cannot be right: a wrongly
    labelled offset), no id, or a send time not known. A person looks. Every reading
    of Violet's clock is :func:`no_baseline_window`'s (``read_server_time``: the
    read's own ``Date``; ``read_at``: this machine's time when it arrived). With a
    baseline, a date never rules a refund out (a ``Date`` header hours off would make
    our own refund look old); without one, only a date earlier than the send under
    every reading of the clock, by more than a day's worth of time zones, does.

    A refund already handed to another call (``known``, ``ask.others``, or one that may
    be a refund another call got without its id: ``ask.unnamed``) is never claimed; and
    since it is skipped only for being someone else's, it never proves absence either:
    when it is all that matches, the verdict is OWNED.
    """
    sure, latest = send_offsets(ask, settings)[3], latest_own(ask, settings)
    window: tuple[float, float, float | None] | None = None  # built once
    sent = ask.first_sent_at
    exact: list[OrderRefund] = []
    near: list[OrderRefund] = []
    undated: list[OrderRefund] = []
    owned: list[OrderRefund] = []
    twins: list[OrderRefund] = []
    first_doubt = ""
    other_currency = False
    taken = _unnamed_taken(
        ask, refunds, known, settings, read_server_time=read_server_time, read_at=read_at
    )
    for at, refund in enumerate(refunds):
        if ask.baseline is not None and refund.id is not None and refund.id in ask.baseline:
            continue
        span = _created(refund)
        if window is None:
            window = no_baseline_window(ask, settings, read_server_time, read_at)
        floor, gone, ceiling = window
        if (
            ask.baseline is None
            and refund.id is not None
            and span is not None
            and sent is not None
            and latest_moment(span) < sent + gone
            and (ask.listed_after_send is None or refund.id in ask.listed_after_send)
        ):
            # Made long before this ask was first sent, by every reading; unless the
            # first read after the send did not list it (it appeared since: its date is
            # on another clock than every reading, ``PendingRefund.listed_after_send``).
            continue
        if _elsewhere(ask, refund, refunds, bag, known, taken=at in taken, near=near):
            continue
        doubt = _doubt(refund, span, sent, floor=floor, ceiling=ceiling, sure=sure, latest=latest)
        verdict = content(ask, refund, refunds, bag)
        if verdict is Verdict.MISS:
            if (
                not other_currency
                and bag is None
                and _amount_only_miss(ask, refund, refunds)
                and not _held(ask, refund, known)
            ):
                other_currency = True
            continue
        if _held(ask, refund, known) or (at in taken):
            owned.append(refund)
        elif doubt is not None:
            if verdict is Verdict.MATCH:
                undated.append(refund)
                first_doubt = first_doubt or doubt
            else:
                near.append(refund)
        elif verdict is Verdict.MATCH:
            exact.append(refund)
        else:
            near.append(refund)
            if refund.status in _DEAD and _live_twin(ask, refund, refunds, bag):
                twins.append(refund)
    seen = frozenset(r.id for r in (*exact, *near, *undated, *owned) if r.id is not None)
    if len(exact) > 1:
        return Reading(Verdict.MANY, tuple(exact), seen)
    if exact and twins:
        # A FAILED (or CANCELED) attempt carrying exactly what was asked, dated after
        # the send like the match: either may be this ask's (its attempt refused, and
        # another system's refund the match). A person looks.
        return Reading(Verdict.NEAR, tuple(exact + twins), seen)
    if undated:
        return Reading(Verdict.UNDATED, tuple(exact + undated), seen, first_doubt)
    if exact:
        return Reading(Verdict.MATCH, tuple(exact), seen)
    if near:
        return Reading(Verdict.NEAR, tuple(near), seen)
    if owned:
        return Reading(Verdict.OWNED, tuple(owned), seen)
    if bag is not None and effect_visible(ask, bag):
        return Reading(Verdict.EFFECT_WITHOUT_REFUND, (), seen)
    return Reading(Verdict.MISS, (), seen, other_currency=other_currency)


def _held(ask: PendingRefund, refund: OrderRefund, known: Container[int]) -> bool:
    """``refund`` was handed to another call (``known``, or ``ask.others``)."""
    return refund.id is not None and (refund.id in known or refund.id in ask.others)


def _elsewhere(
    ask: PendingRefund,
    refund: OrderRefund,
    refunds: Sequence[OrderRefund],
    bag: OrderBag | None,
    known: Container[int],
    *,
    taken: bool,
    near: list[OrderRefund],
) -> bool:
    """Whether ``refund``, a record of this bag's list, names another bag or another
    order: that bag's (a list may carry them), or this bag's own refund labelled with
    another bag (a backend filling ``bag_id`` from the order's first bag). Left out as
    another bag's, an ask's own refund was proven absent and sent again (review 22);
    taken as this ask's, another order's refund under this bag's id was returned as
    its own (review 25: a 2xx naming another order is refused as not this
    request's, and the read-back that followed claimed the same record). One carrying
    what was asked that no other call holds (``taken``: it may be a refund another
    call got without its id) is added to ``near``: for review, never claimed, never a
    miss. For a whole-bag refund or a cancel, what was left of this bag cannot be held
    against a record of another: one that moved money is near."""
    if on_bag(refund, ask.bag_id) and on_order(refund, ask.order_id):
        return False
    if taken or _held(ask, refund, known):
        return True
    if needs_bag(ask):
        if refund.status not in _DEAD:
            near.append(refund)
    elif content(ask, refund, refunds, bag) is not Verdict.MISS:
        near.append(refund)
    return True


def _amount_only_miss(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund]
) -> bool:
    """``refund`` (a miss) names a currency of its own, moved money, and would carry
    what was asked but for its amount: with the bag's currency unknown, that amount
    may be this ask's in another currency."""
    request = ask.request
    if (
        not isinstance(request, RefundBagRequest)
        or request.amount_refunded is None
        or not refund.refund_currency
        or refund.amount is None
        or refund.status in _DEAD
    ):
        return False
    same = attrs.evolve(refund, amount=request.amount_refunded)
    return content(ask, same, refunds, None) is not Verdict.MISS


def _unnamed_taken(
    ask: PendingRefund,
    refunds: Sequence[OrderRefund],
    known: Container[int],
    settings: Settings,
    *,
    read_server_time: float | None,
    read_at: float | None,
) -> set[int]:
    """Positions in ``refunds`` that may be refunds other calls got without their id
    (``ask.unnamed``); a record known as another call's never narrows them. Every
    record of such a refund's amount dated no earlier than this ask could claim is
    one (:func:`idless_fits`'s ``since``): a list may date a refund minutes before
    its answer did, and it is then never this ask's."""
    taken: set[int] = set()
    if not ask.unnamed:
        return taken
    since = None
    if ask.first_sent_at is not None:
        floor = no_baseline_window(ask, settings, read_server_time, read_at)[0]
        since = ask.first_sent_at + floor
    base = ask.baseline or frozenset()

    def owned_elsewhere(refund_id: int) -> bool:
        return refund_id in known or refund_id in ask.others or refund_id in base

    for amount, date in ask.unnamed:
        taken.update(idless_fits(amount, date, refunds, owned_elsewhere, since=since))
    return taken


def idless_fits(
    amount: int | None,
    date: float | None,
    refunds: Sequence[OrderRefund],
    owned: Callable[[int], bool] = lambda _: False,
    *,
    since: float | None = None,
) -> list[int]:
    """The positions in ``refunds`` (one read of a bag) of the records that may be a
    refund handed out without its id, as the answer gave its ``amount`` and ``date``
    (Unix seconds; None where it left them out): nothing either says tells them apart.

    Every record of its amount not older than the answer by more than
    ``IDLESS_EARLIER`` fits, however close another's date: a platform may stamp a
    refund when it has processed it, seconds or minutes after its answer, and a record
    dated like the answer may be another process's (or another bag's). So does every
    record of its amount dated at or after ``since`` (the earliest date the ask judging
    the read could claim: :func:`judge`): the answer and the list may be stamped by two
    clocks of Violet's, or at two moments, further apart than that, and a record that
    fits no other rule would then pass for the next ask's own. Records ``owned`` by a
    known call are left out (they are someone's already)."""
    fits: list[int] = []
    for at, refund in enumerate(refunds):
        if amount is not None and refund.amount is not None and amount != refund.amount:
            continue
        if refund.id is not None and owned(refund.id):
            continue
        when = unix_time(refund.date_created)
        if (
            date is None
            or when is None
            or placeholder_date(when)
            or when - date >= -IDLESS_EARLIER
            or (since is not None and when >= since)
        ):
            fits.append(at)
    return fits


def _live_twin(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> bool:
    """``refund`` (FAILED or CANCELED) carries exactly what was asked: it would be a
    match had it moved money."""
    alive = attrs.evolve(refund, status=RefundStatus.COMPLETED)
    return content(ask, alive, refunds, bag) is Verdict.MATCH


def effect_visible(ask: PendingRefund, bag: OrderBag) -> bool:
    """The bag's state already shows what this ask would do (a re-send would be refused
    or, worse, apply): CANCELED for a cancel, REFUNDED for a whole-bag refund."""
    if ask.kind == "cancel":
        return bag.status is BagStatus.CANCELED
    return needs_bag(ask) and bag.status is BagStatus.REFUNDED
