"""The verdicts of an audit, for one bag: which refund on the bag each row asked for,
decided with the never-twice matching rule's own request-vs-refund comparison
(:func:`violet_async._matching.content`), as pure functions over what was read.

Violet's records come first, the journal second: a row is ``as_asked`` because Violet
shows exactly its refund, never because a journal says so; the journal only breaks
ties (the refund it recorded is tried first) and tells what our side believed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ._ask import sent_once
from ._journal_index import OPEN_STATES
from ._matching import Verdict, _sku_totals, _strip, content
from .models import (
    CancelBagRequest,
    OrderBag,
    OrderRefund,
    RefundBagRequest,
    RefundStatus,
)

if TYPE_CHECKING:
    from .batch import BatchItem

__all__ = ["Audit", "AuditRow", "JournalView", "judge_bag", "unreadable"]

Audit = Literal["as_asked", "missing", "extra", "mismatch", "unreadable"]
#: The verdicts, in the order a summary shows them.
AUDITS: tuple[Audit, ...] = ("as_asked", "missing", "extra", "mismatch", "unreadable")
#: Verdicts that say money is not as asked (``unreadable`` says nothing about money).
MONEY_OFF = frozenset({"missing", "extra", "mismatch"})

_DEAD = frozenset({RefundStatus.FAILED, RefundStatus.CANCELED})


@attrs.frozen
class JournalView:
    """What our side recorded for a row: the batch journal's last line for it, or the
    fleet ledger's record."""

    source: Literal["journal", "ledger"]
    state: str | None
    """None: the journal has no line for this row (never started)."""
    refund_id: int | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.state in ("done", "applied")

    def describe(self) -> str:
        state, refund = self.state, self.refund_id
        if state is None or state == "new":
            return f"the {self.source} never sent it"
        if state == "unreadable":
            return f"the {self.source} could not be read ({self.error})"
        if self.succeeded:
            which = "no refund id recorded" if refund is None else f"refund {refund}"
            return f"the {self.source} says succeeded ({which})"
        if state == "failed":
            return f"the {self.source} says Violet refused it ({self.error or 'failed'})"
        if state == "unsent":
            return f"the {self.source} says it never reached Violet"
        if state == "present":
            return f"the {self.source} found it already on the bag (refund {refund}), not sent"
        if state in ("sent", "pending", "unknown"):
            return f"the {self.source} says {state}: it may have applied (outcome not known)"
        return f"the {self.source} says {state}"


@attrs.frozen
class AuditRow:
    """One row's verdict.

    ``refund_ids`` are the refunds the verdict is about: for ``as_asked`` the row's
    refund; for ``extra`` the row's own refund (if any) first, then the extras; for
    ``mismatch`` the refund that almost matches. ``refunds`` holds their records (and
    those of refunds no row asked for that this row reports). ``money`` is the row's
    amount under its verdict, in ``currency``'s minor unit: the refund (as_asked), the
    extras (extra), what was refunded instead (mismatch), what was asked (missing; None
    when the row does not name an amount and the bag's total is not known).
    ``unasked_money`` is money of refunds no row asked for that this row reports
    without being ``extra`` itself. ``ours`` (as_asked) says whether the journal
    recorded making that refund (None: no journal given, it recorded no refund id, or
    it left the row open: sent, pending or unknown, so the refund may be ours).
    ``loud``: missing, although the journal says it succeeded.

    ``detail`` quotes server text (reasons, statuses, error messages) as it came:
    escape control characters before printing it (the CLI does).
    """

    item: BatchItem
    audit: Audit
    refund_ids: tuple[int, ...] = ()
    detail: str = ""
    refunds: tuple[OrderRefund, ...] = ()
    journal: JournalView | None = None
    ours: bool | None = None
    currency: str | None = None
    money: int | None = None
    unasked_money: int = 0
    loud: bool = False


@attrs.frozen
class Asked:
    """A row to audit and what the journal says of it."""

    item: BatchItem
    journal: JournalView | None = None


def unreadable(rows: Sequence[Asked], why: str) -> list[AuditRow]:
    """Every row of a bag that could not be read: a verdict about the read, not money."""
    return [
        AuditRow(
            row.item, "unreadable", detail=f"bag could not be read: {why}", journal=row.journal
        )
        for row in rows
    ]


_ZERO_DECIMAL = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "ISK",
        "JPY",
        "KMF",
        "KRW",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
#: Currencies whose minor unit is a thousandth (ISO 4217 exponent 3).
_THREE_DECIMAL = frozenset(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"])


def format_money(cents: int, currency: str | None) -> str:
    """Minor units as the currency writes them: ``USD 1,234.50``, ``JPY 1,500``,
    ``KWD 12.340``."""
    code = currency or "?"
    if code in _ZERO_DECIMAL:
        return f"{code} {cents:,}"
    unit, digits = (1000, 3) if code in _THREE_DECIMAL else (100, 2)
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{code} {sign}{cents // unit:,}.{cents % unit:0{digits}d}"


def describe_refund(refund: OrderRefund, currency: str | None = None) -> str:
    """``refund 9001 USD 5.00 EXTERNAL 2026-12-05T10:00:00+00:00 'reason'``: id,
    amount, status, date and reason (server text; the CLI escapes what it prints)."""
    parts = [f"refund {refund.id if refund.id is not None else '(no id)'}"]
    if refund.amount is None:
        parts.append("(amount not given)")
    else:
        parts.append(format_money(refund.amount, refund.refund_currency or currency))
    if refund.status is not None:
        parts.append(str(refund.status))
    parts.append(refund.date_created.isoformat() if refund.date_created else "undated")
    if refund.reason:
        parts.append(repr(refund.reason))
    return " ".join(parts)


def _cents(refund: OrderRefund) -> int:
    """A refund's amount for a sum. The audit judges only lists whose every record
    carries its amount (a record without one makes the bag unreadable), so the 0 is
    never counted there."""
    return refund.amount or 0


def _live(refund: OrderRefund) -> bool:
    """The refund moved money (or may still): not FAILED or CANCELED."""
    return refund.status not in _DEAD


def _asked_amount(item: BatchItem, refunds: Sequence[OrderRefund], bag: OrderBag) -> int | None:
    request = item.request
    if isinstance(request, RefundBagRequest) and request.amount_refunded is not None:
        return request.amount_refunded
    if isinstance(request, RefundBagRequest) and request.skus is not None:
        return None  # lines without an amount: the platform prices them
    if bag.total is None:
        return None
    return bag.total - sum(_cents(r) for r in refunds if _live(r))  # what is left


def _probe(item: BatchItem, refund: OrderRefund) -> RefundBagRequest | None:
    """The row's request with the refund's amount in place of its own, to ask the
    matching rule whether anything *but* the amount (or the bag's status) differs."""
    request = item.request
    if refund.amount is None:
        return None  # no amount to put in: nothing but the amount could be compared
    if isinstance(request, CancelBagRequest):
        return RefundBagRequest(amount_refunded=refund.amount, reason=request.reason)
    if request.amount_refunded is None and request.skus is not None:
        return None  # lines only: the matching rule already weighs them
    return attrs.evolve(request, amount_refunded=refund.amount)


def _corroborated(item: BatchItem) -> bool:
    """Something besides the amount ties a row to a refund of another amount: a reason,
    SKU lines, or a whole-bag ask (the bag's one refund of what was left)."""
    request = item.request
    if isinstance(request, CancelBagRequest):
        return True
    if request.amount_refunded is None:
        return True
    return bool(_strip(request.reason)) or request.skus is not None


def _size_difference(
    request: RefundBagRequest | CancelBagRequest, refund: OrderRefund, bag: OrderBag
) -> str | None:
    """How the refund's size differs from what the row asked: another amount, or a
    bag that does not (yet) read as the whole-bag refund or cancel left it."""
    if isinstance(request, CancelBagRequest):
        return (
            f"a cancel was asked: refunded {refund.amount} of a bag of {bag.total}, "
            f"the bag reads {bag.status}"
        )
    if request.amount_refunded is not None:
        if refund.amount != request.amount_refunded:
            said = f"amount: asked {request.amount_refunded}, refunded {refund.amount}"
            if request.shipping is not None and refund.amount is not None:
                said += (
                    f" (the shipping asked, {request.shipping.amount}, may be in or out of "
                    "the record's amount: Violet does not say which, so it cannot be told)"
                )
            return said
    elif request.skus is None:
        return (
            f"the whole bag was asked: refunded {refund.amount} of a bag of {bag.total}, "
            f"the bag reads {bag.status}"
        )
    return None


def differences(item: BatchItem, refund: OrderRefund, bag: OrderBag) -> list[str]:
    """What differs between a row and a refund that almost matches it, in words."""
    request = item.request
    size = _size_difference(request, refund, bag)
    found = [size] if size is not None else []
    if isinstance(request, RefundBagRequest) and request.skus is not None:
        asked, got = _sku_totals(request.skus), _sku_totals(refund.skus)
        if not got:
            found.append(
                f"lines: asked {dict(asked)}, the record lists none "
                "(Violet may leave them out: whether it is this row's cannot be told)"
            )
        elif asked != got:
            found.append(f"lines: asked {dict(asked)}, refunded {dict(got)}")
    reason = _strip(request.reason)
    if reason and refund.reason is not None and _strip(refund.reason) != reason:
        found.append(f"reason: asked {request.reason!r}, refund says {refund.reason!r}")
    shipping = request.shipping if isinstance(request, RefundBagRequest) else None
    shipped = refund.shipping.amount if refund.shipping is not None else None
    if shipping is not None and shipped is not None and shipped != shipping.amount:
        found.append(f"shipping: asked {shipping.amount}, refunded {shipped}")
    if refund.status in _DEAD:
        found.append(f"status {refund.status}: no money moved")
    return found or ["it is not what was left on the bag when it was made"]


def _assign(preferences: list[list[int]]) -> dict[int, int]:
    """A largest assignment of rows to refunds (each refund to one row) over the exact
    matches, each row trying its preferences in order: augmenting paths, breadth
    first (no recursion, so a bag with thousands of identical rows is fine)."""
    owner: dict[int, int] = {}
    chosen: dict[int, int] = {}
    for start, prefs in enumerate(preferences):
        if not prefs:
            continue
        reached_from: dict[int, int] = {}
        queue = [start]
        free: int | None = None
        while queue and free is None:
            row = queue.pop(0)
            for refund in preferences[row]:
                if refund in reached_from:
                    continue
                reached_from[refund] = row
                if refund not in owner:
                    free = refund
                    break
                queue.append(owner[refund])
        refund_at: int | None = free
        while refund_at is not None:
            row = reached_from[refund_at]
            previous = chosen.get(row)
            owner[refund_at] = row
            chosen[row] = refund_at
            refund_at = None if row == start else previous
    return chosen


def judge_bag(
    rows: Sequence[Asked],
    refunds: Sequence[OrderRefund],
    bag: OrderBag,
    currency: str | None = None,
) -> list[AuditRow]:
    """One verdict per row of ``rows`` (all on ``bag``), from the bag's ``refunds``.

    1. Exact matches (the matching rule says MATCH) are assigned one refund per row,
       as many rows as possible, the journal's refund first: those rows are as_asked.
    2. A refund left over that exactly matches an assigned row is a double: that row
       is ``extra``.
    3. A row left without a refund takes a left-over refund that almost matches it
       (NEAR, or the same but for the amount with a reason or lines agreeing):
       ``mismatch``; otherwise it is ``missing``.
    4. Refunds no row asked for (an EXTERNAL one, another system's) make the first
       as_asked row of the bag ``extra``; with no such row, they join the first extra
       row, or else the first row reports them and keeps its verdict. FAILED or
       CANCELED refunds moved no money: never counted, named on a missing row they
       would match.
    """
    return _Bag(rows, refunds, bag, currency).judge()


class _Bag:
    """One bag's rows and refunds, and the matching rule's verdict for every pair."""

    def __init__(
        self,
        rows: Sequence[Asked],
        refunds: Sequence[OrderRefund],
        bag: OrderBag,
        currency: str | None,
    ) -> None:
        self.rows = rows
        self.bag = bag
        self.currency = currency
        self.on_bag = [r for r in refunds if r.bag_id is None or r.bag_id == bag.id]
        self.verdicts = [
            [
                content(self._ask(row.item, row.item.request), r, self.on_bag, bag)
                for r in self.on_bag
            ]
            for row in rows
        ]
        self._index = {r.id: j for j, r in enumerate(self.on_bag) if r.id is not None}

    def _ask(self, item: BatchItem, request: RefundBagRequest | CancelBagRequest) -> Any:
        if isinstance(request, CancelBagRequest):
            return sent_once("cancel", item.order_id, self.bag.id, request, None)
        return sent_once("refund", item.order_id, self.bag.id, request, None)

    def _pinned(self, i: int) -> int | None:
        """The refund (index) the row's journal says it made, when it is on the bag."""
        view = self.rows[i].journal
        if view is None or view.refund_id is None:
            return None
        return self._index.get(view.refund_id)

    def _preferred(self, i: int, candidates: Iterable[int]) -> list[int]:
        first = self._pinned(i)
        return sorted(candidates, key=lambda j: (j != first, self.on_bag[j].id or 0))

    def _exact(self) -> dict[int, int]:
        # Rows whose journal names a refund go first, so they get the one it names.
        sequence = sorted(range(len(self.rows)), key=lambda i: (self._pinned(i) is None, i))
        prefs = [
            self._preferred(i, (j for j, v in enumerate(self.verdicts[i]) if v is Verdict.MATCH))
            for i in sequence
        ]
        own = {sequence[k]: j for k, j in _assign(prefs).items()}
        taken = set(own.values())
        for i in range(len(self.rows)):
            if i not in own:
                j = self._emptied_by(i, taken)
                if j is not None:
                    own[i] = j
                    taken.add(j)
        return own

    def _emptied_by(self, i: int, taken: set[int]) -> int | None:
        """For a whole-bag or cancel row: the refund that emptied the bag, when more
        refunds came after it. The never-twice rule leaves such a refund to a person
        (it did not close the bag for good, or ids do not grow with time); an audit
        asks what happened: the row's refund is the one that refunded what was left,
        and what came after it is money no row asked for (``extra``)."""
        request, total = self.rows[i].item.request, self.bag.total
        whole = isinstance(request, CancelBagRequest) or (
            request.amount_refunded is None and request.skus is None
        )
        if not whole or total is None:
            return None
        live = sorted(
            (j for j, r in enumerate(self.on_bag) if _live(r) and r.id is not None),
            key=lambda j: self.on_bag[j].id or 0,
        )
        paid = 0
        for k, j in enumerate(live[:-1]):  # the last one: the rule judged it already
            refund = self.on_bag[j]
            if refund.amount is None:
                return None
            if refund.amount == total - paid:
                if j in taken:
                    return None
                before = [self.on_bag[x] for x in live[: k + 1]]
                ask = self._ask(self.rows[i].item, request)
                return j if content(ask, refund, before, self.bag) is Verdict.MATCH else None
            paid += refund.amount
        return None

    def _almost(self, i: int, unasked: list[int]) -> int | None:
        """A refund no row took that almost matches row ``i``, or None."""
        item = self.rows[i].item
        candidates = [j for j in unasked if self.verdicts[i][j] is Verdict.NEAR]
        if not candidates and _corroborated(item):
            for j in unasked:
                probe = _probe(item, self.on_bag[j])
                if probe is None:
                    continue
                verdict = content(self._ask(item, probe), self.on_bag[j], self.on_bag, self.bag)
                if verdict is not Verdict.MISS:
                    candidates.append(j)
        return self._preferred(i, candidates)[0] if candidates else None

    def ids(self, js: Iterable[int]) -> tuple[int, ...]:
        return tuple(i for i in (self.on_bag[j].id for j in js) if i is not None)

    def told(self, js: Iterable[int]) -> str:
        return "; ".join(describe_refund(self.on_bag[j], self.currency) for j in js)

    def _leftovers(self, own: dict[int, int]) -> tuple[dict[int, list[int]], list[int], list[int]]:
        """Refunds no row took: doubles (by the row they match), asked by no row, and
        FAILED or CANCELED ones."""
        extras: dict[int, list[int]] = {}
        unasked: list[int] = []
        dead: list[int] = []
        taken = set(own.values())
        for j, refund in enumerate(self.on_bag):
            if j in taken:
                continue
            if not _live(refund):
                dead.append(j)
                continue
            doubles = [i for i in own if self.verdicts[i][j] is Verdict.MATCH]
            if doubles:
                extras.setdefault(min(doubles), []).append(j)
            else:
                unasked.append(j)
        return extras, unasked, dead

    def judge(self) -> list[AuditRow]:
        own = self._exact()
        extras, unasked, dead = self._leftovers(own)
        near: dict[int, int] = {}
        for i in range(len(self.rows)):
            if i not in own:
                pick = self._almost(i, unasked)
                if pick is not None:
                    near[i] = pick
                    unasked.remove(pick)
        results = []
        for i in range(len(self.rows)):
            if i in own:
                results.append(self._found(i, own[i], extras.get(i, [])))
            elif i in near:
                results.append(self._mismatch(i, near[i]))
            else:
                failed = [j for j in dead if self.verdicts[i][j] is not Verdict.MISS]
                results.append(self._missing(i, failed))
        if unasked:
            self._report_unasked(results, unasked)
        return results

    def _found(self, i: int, j: int, more: list[int]) -> AuditRow:
        row, refund = self.rows[i], self.on_bag[j]
        view = row.journal
        ours = None
        # Succeeded without a refund id, or left open (it may have applied): our side
        # cannot say whose refund this is.
        known = view is not None and view.state not in OPEN_STATES
        if view is not None and known and not (view.succeeded and view.refund_id is None):
            ours = view.succeeded and view.refund_id == refund.id
        said = "" if view is None or ours else f"; {view.describe()}"
        if view is not None and view.refund_id not in (None, refund.id):
            said += f" (Violet shows refund {view.refund_id} nowhere as asked)"
        if more:
            return AuditRow(
                row.item,
                "extra",
                refund_ids=self.ids([j, *more]),
                detail=f"{len(more) + 1} refunds on the bag match this row, one was asked: "
                f"{self.told([j])} as asked; extra: {self.told(more)}{said}",
                refunds=tuple(self.on_bag[k] for k in (j, *more)),
                journal=view,
                ours=ours,
                currency=self.currency,
                money=sum(_cents(self.on_bag[k]) for k in more),
            )
        status = ""
        if refund.status is not None and not refund.status.is_terminal:
            status = f" (status {refund.status}: not final yet)"
        made = ""
        if ours is not None:
            made = "; made by this tool's run" if ours else "; not made by this tool's run"
        return AuditRow(
            row.item,
            "as_asked",
            refund_ids=self.ids([j]),
            detail=f"{self.told([j])}{status}{made}{said}",
            refunds=(refund,),
            journal=view,
            ours=ours,
            currency=self.currency,
            money=refund.amount,
        )

    def _mismatch(self, i: int, j: int) -> AuditRow:
        row, refund = self.rows[i], self.on_bag[j]
        view = row.journal
        said = f"; {view.describe()}" if view is not None else ""
        found = differences(row.item, refund, self.bag)
        currency = self.currency
        other = refund.refund_currency
        if other and currency and other.upper() != currency.upper():
            # Amounts in two currencies are never compared; the money is the refund's.
            found = [
                f"currency: the bag is in {currency}, the refund was recorded in {other} "
                "(amounts in two currencies are not compared)"
            ]
            currency = other
        return AuditRow(
            row.item,
            "mismatch",
            refund_ids=self.ids([j]),
            detail=f"{self.told([j])} almost matches: {'; '.join(found)}{said}",
            refunds=(refund,),
            journal=view,
            currency=currency,
            money=refund.amount,
        )

    def _missing(self, i: int, failed: list[int]) -> AuditRow:
        row = self.rows[i]
        view = row.journal
        note = f"; on the bag, no money moved: {self.told(failed)}" if failed else ""
        loud = view is not None and view.succeeded
        if view is not None and loud:
            which = "" if view.refund_id is None else f" (refund {view.refund_id})"
            detail = (
                f"THE {view.source.upper()} SAYS SUCCEEDED{which} BUT "
                f"VIOLET SHOWS NO SUCH REFUND ON THE BAG{note}"
            )
        else:
            said = f"; {view.describe()}" if view is not None else ""
            detail = f"no such refund on the bag{note}{said}"
        return AuditRow(
            row.item,
            "missing",
            detail=detail,
            refunds=tuple(self.on_bag[j] for j in failed),
            journal=view,
            currency=self.currency,
            money=_asked_amount(row.item, self.on_bag, self.bag),
            loud=loud,
        )

    def _report_unasked(self, results: list[AuditRow], unasked: list[int]) -> None:
        """Refunds no row asked for go on one row of the bag (see :func:`judge_bag`)."""
        money = sum(_cents(self.on_bag[j]) for j in unasked)
        records = tuple(self.on_bag[j] for j in unasked)
        text = f"on the bag, asked by no row: {self.told(unasked)}"
        at = next((k for k, r in enumerate(results) if r.audit == "as_asked"), None)
        if at is None:
            at = next((k for k, r in enumerate(results) if r.audit == "extra"), 0)
        row = results[at]
        changes: dict[str, Any] = {
            "detail": f"{row.detail}; {text}",
            "refunds": row.refunds + records,
        }
        if row.audit in ("as_asked", "extra"):
            changes["audit"] = "extra"
            changes["refund_ids"] = row.refund_ids + self.ids(unasked)
            changes["money"] = (row.money or 0 if row.audit == "extra" else 0) + money
        else:
            changes["unasked_money"] = money
        results[at] = attrs.evolve(row, **changes)
