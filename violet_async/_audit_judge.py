"""The verdicts of an audit, for one bag: which refund on the bag each row asked for,
decided with the never-twice matching rule's own request-vs-refund comparison
(:func:`violet_async._matching.content`), as pure functions over what was read.

Violet's records come first, the journal second: a row is ``as_asked`` because Violet
shows exactly its refund, never because a journal says so; the journal only breaks
ties (the refund it recorded is tried first) and tells what our side believed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import attrs

from ._ask import sent_once
from ._matching import Verdict, _sku_totals, _strip, content
from .models import (
    BagStatus,
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
        if self.succeeded:
            return f"the {self.source} says succeeded (refund {refund})"
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
    recorded making that refund (None: no journal given). ``loud``: missing, although
    the journal says it succeeded.
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
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split()
)


def format_money(cents: int, currency: str | None) -> str:
    """Minor units as the currency writes them: ``USD 1,234.50``, ``JPY 1,500``."""
    code = currency or "?"
    if code in _ZERO_DECIMAL:
        return f"{code} {cents:,}"
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{code} {sign}{cents // 100:,}.{cents % 100:02d}"


def describe_refund(refund: OrderRefund, currency: str | None = None) -> str:
    """``refund 9001 USD 5.00 EXTERNAL 2026-12-05T10:00:00+00:00 'reason'``: id,
    amount, status, date and reason (server text; the CLI escapes what it prints)."""
    parts = [f"refund {refund.id if refund.id is not None else '(no id)'}"]
    parts.append(format_money(refund.amount, refund.refund_currency or currency))
    if refund.status is not None:
        parts.append(str(refund.status))
    parts.append(refund.date_created.isoformat() if refund.date_created else "undated")
    if refund.reason:
        parts.append(repr(refund.reason))
    return " ".join(parts)


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
    return bag.total - sum(r.amount for r in refunds if _live(r))  # what is left


def _probe(item: BatchItem, refund: OrderRefund) -> RefundBagRequest | None:
    """The row's request with the refund's amount in place of its own, to ask the
    matching rule whether anything *but* the amount (or the bag's status) differs."""
    request = item.request
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


def differences(item: BatchItem, refund: OrderRefund, bag: OrderBag) -> list[str]:
    """What differs between a row and a refund that almost matches it, in words."""
    request = item.request
    found = []
    if isinstance(request, CancelBagRequest):
        if bag.status is not BagStatus.CANCELED:
            found.append(f"a cancel was asked, the bag reads {bag.status}")
    elif request.amount_refunded is not None:
        if refund.amount != request.amount_refunded:
            found.append(f"amount: asked {request.amount_refunded}, refunded {refund.amount}")
    elif request.skus is None:
        if bag.status is not BagStatus.REFUNDED:
            found.append(f"the whole bag was asked, the bag reads {bag.status}")
    if isinstance(request, RefundBagRequest) and request.skus is not None:
        asked, got = _sku_totals(request.skus), _sku_totals(refund.skus)
        if asked != got:
            found.append(f"lines: asked {dict(asked)}, refunded {dict(got)}")
    if _strip(request.reason) and refund.reason is not None:
        if _strip(refund.reason) != _strip(request.reason):
            found.append(f"reason: asked {request.reason!r}, refund says {refund.reason!r}")
    if isinstance(request, RefundBagRequest) and request.shipping is not None:
        shipped = refund.shipping.amount if refund.shipping is not None else None
        if shipped is not None and shipped != request.shipping.amount:
            found.append(f"shipping: asked {request.shipping.amount}, refunded {shipped}")
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


def judge_bag(  # noqa: PLR0912, PLR0914, PLR0915 - one pass per verdict, in order
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
       as_asked row of the bag ``extra``; with no such row, the first row reports
       them and keeps its verdict. FAILED or CANCELED refunds moved no money: never
       counted, named on a missing row they would match.
    """
    bag_id = bag.id
    on_bag = [r for r in refunds if r.bag_id is None or r.bag_id == bag_id]
    asks = [
        sent_once(row.item.kind, row.item.order_id, bag_id, row.item.request, None) for row in rows
    ]
    verdicts = [[content(ask, refund, on_bag, bag) for refund in on_bag] for ask in asks]
    index_of = {r.id: j for j, r in enumerate(on_bag) if r.id is not None}

    def pinned(i: int) -> int | None:
        view = rows[i].journal
        if view is None or view.refund_id is None:
            return None
        return index_of.get(view.refund_id)

    def order_for(i: int, wanted: Verdict) -> list[int]:
        hits = [j for j, v in enumerate(verdicts[i]) if v is wanted]
        first = pinned(i)
        return sorted(hits, key=lambda j: (j != first, on_bag[j].id or 0))

    # Rows whose journal names a refund go first, so they get the one it names.
    sequence = sorted(range(len(rows)), key=lambda i: (pinned(i) is None, i))
    chosen_in_sequence = _assign([order_for(i, Verdict.MATCH) for i in sequence])
    own: dict[int, int] = {sequence[k]: j for k, j in chosen_in_sequence.items()}
    taken = set(own.values())

    extras: dict[int, list[int]] = {}
    unasked: list[int] = []
    dead: list[int] = []
    for j, refund in enumerate(on_bag):
        if j in taken:
            continue
        if not _live(refund):
            dead.append(j)
            continue
        doubles = [i for i in range(len(rows)) if verdicts[i][j] is Verdict.MATCH and i in own]
        if doubles:
            extras.setdefault(doubles[0], []).append(j)
        else:
            unasked.append(j)

    near: dict[int, int] = {}
    for i in range(len(rows)):
        if i in own:
            continue
        candidates = [j for j in unasked if verdicts[i][j] is Verdict.NEAR]
        if not candidates and _corroborated(rows[i].item):
            for j in unasked:
                probe = _probe(rows[i].item, on_bag[j])
                if probe is None:
                    break
                probe_ask = sent_once("refund", rows[i].item.order_id, bag_id, probe, None)
                if content(probe_ask, on_bag[j], on_bag, bag) is not Verdict.MISS:
                    candidates.append(j)
        if candidates:
            first = pinned(i)
            pick = min(candidates, key=lambda j: (j != first, on_bag[j].id or 0))
            near[i] = pick
            unasked.remove(pick)

    def ids(js: Sequence[int]) -> tuple[int, ...]:
        return tuple(on_bag[j].id for j in js if on_bag[j].id is not None)  # type: ignore[misc]

    def told(js: Sequence[int]) -> str:
        return "; ".join(describe_refund(on_bag[j], currency) for j in js)

    results: list[AuditRow] = []
    for i, row in enumerate(rows):
        view = row.journal
        said = f"; {view.describe()}" if view is not None else ""
        if i in own:
            j = own[i]
            refund = on_bag[j]
            ours = None if view is None else (view.succeeded and view.refund_id == refund.id)
            if view is not None and view.refund_id not in (None, refund.id):
                said += f" (Violet shows refund {view.refund_id} nowhere as asked)"
            if i in extras:
                more = extras[i]
                results.append(
                    AuditRow(
                        row.item,
                        "extra",
                        refund_ids=ids([j, *more]),
                        detail=f"{len(more) + 1} refunds on the bag match this row, one was "
                        f"asked: {told([j])} as asked; extra: {told(more)}{said}",
                        refunds=tuple(on_bag[k] for k in (j, *more)),
                        journal=view,
                        ours=ours,
                        currency=currency,
                        money=sum(on_bag[k].amount for k in more),
                    )
                )
                continue
            status = (
                ""
                if refund.status is None or refund.status.is_terminal
                else (f" (status {refund.status}: not final yet)")
            )
            made = (
                ""
                if ours is None
                else ("; made by this journal" if ours else "; not made by this journal")
            )
            results.append(
                AuditRow(
                    row.item,
                    "as_asked",
                    refund_ids=ids([j]),
                    detail=f"{told([j])}{status}{made}{said if not ours else ''}",
                    refunds=(refund,),
                    journal=view,
                    ours=ours,
                    currency=currency,
                    money=refund.amount,
                )
            )
        elif i in near:
            j = near[i]
            results.append(
                AuditRow(
                    row.item,
                    "mismatch",
                    refund_ids=ids([j]),
                    detail=f"{told([j])} almost matches: "
                    f"{'; '.join(differences(row.item, on_bag[j], bag))}{said}",
                    refunds=(on_bag[j],),
                    journal=view,
                    currency=currency,
                    money=on_bag[j].amount,
                )
            )
        else:
            failed = [j for j in dead if verdicts[i][j] is not Verdict.MISS]
            note = f"; on the bag, no money moved: {told(failed)}" if failed else ""
            detail = "no such refund on the bag" + note + said
            loud = view is not None and view.succeeded
            if view is not None and loud:
                detail = (
                    f"THE {view.source.upper()} SAYS SUCCEEDED (refund {view.refund_id}) BUT "
                    f"VIOLET SHOWS NO SUCH REFUND ON THE BAG{note}"
                )
            results.append(
                AuditRow(
                    row.item,
                    "missing",
                    detail=detail,
                    refunds=tuple(on_bag[j] for j in failed),
                    journal=view,
                    currency=currency,
                    money=_asked_amount(row.item, on_bag, bag),
                    loud=loud,
                )
            )
    if unasked and results:
        at = next((k for k, r in enumerate(results) if r.audit == "as_asked"), None)
        money = sum(on_bag[j].amount for j in unasked)
        text = f"on the bag, asked by no row: {told(unasked)}"
        if at is not None:
            row = results[at]
            results[at] = attrs.evolve(
                row,
                audit="extra",
                refund_ids=row.refund_ids + ids(unasked),
                detail=f"{row.detail}; {text}",
                refunds=row.refunds + tuple(on_bag[j] for j in unasked),
                money=money,
            )
        else:
            at = next((k for k, r in enumerate(results) if r.audit == "extra"), 0)
            row = results[at]
            if row.audit == "extra":
                results[at] = attrs.evolve(
                    row,
                    refund_ids=row.refund_ids + ids(unasked),
                    detail=f"{row.detail}; {text}",
                    refunds=row.refunds + tuple(on_bag[j] for j in unasked),
                    money=(row.money or 0) + money,
                )
            else:
                results[at] = attrs.evolve(
                    row,
                    detail=f"{row.detail}; {text}",
                    refunds=row.refunds + tuple(on_bag[j] for j in unasked),
                    unasked_money=money,
                )
    return results
