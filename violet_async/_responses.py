"""Turning raw responses into models: refunds, refund lists, and both cancel shapes."""

from __future__ import annotations

import email.utils
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson

from ._converter import decode, structure, structure_order_refund
from ._telemetry import request_id_of
from ._transport import RawResponse
from .exceptions import CancellationFailedError, ResponseFormatError
from .models import CancelStatus, Order, OrderCancellation, OrderRefund

__all__ = [
    "PagingError",
    "RefundPage",
    "http_date",
    "next_page",
    "parse_cancel",
    "parse_order",
    "parse_refund",
    "parse_refund_get",
    "parse_refund_list",
    "parse_refund_page",
    "refund_getter",
]

log = logging.getLogger("violet_async.responses")

#: No bag has this many pages of refunds; a server that says so is looping.
MAX_PAGES = 1_000


def _format_error(
    resp: RawResponse, method: str, path: str, problem: str, field: str
) -> ResponseFormatError:
    return ResponseFormatError(
        f"{method} {path}: {problem}",
        body=resp.body,
        status=resp.status,
        field=field,
        method=method,
        path=path,
    )


def parse_order(resp: RawResponse, path: str) -> Order:
    data = decode(resp.body, status=resp.status, method="GET", path=path)
    return structure(data, Order, body=resp.body, status=resp.status, method="GET", path=path)


def parse_refund_get(resp: RawResponse, path: str) -> OrderRefund:
    """One refund read with ``GET /orders/{order_id}/refunds/{refund_id}``."""
    data = decode(resp.body, status=resp.status, method="GET", path=path)
    refund = structure(
        data, OrderRefund, body=resp.body, status=resp.status, method="GET", path=path
    )
    return with_request_id(refund, resp.headers)


def refund_getter(
    order_id: int, bag_id: int, refund_id: int
) -> Callable[[RawResponse, str], OrderRefund]:
    """:func:`parse_refund_get` for one refund: an answer that names another refund,
    bag or order (a cached or misrouted answer) is a :class:`ResponseFormatError`,
    never that refund's state (review 22: another refund's COMPLETED was returned by
    ``wait_for_refund`` as the waited refund's outcome). A field left out names
    nothing."""

    def parse(resp: RawResponse, path: str) -> OrderRefund:
        refund = named(parse_refund_get(resp, path))
        for field, asked, got in (
            ("id", refund_id, refund.id),
            ("order_id", order_id, refund.order_id),
            ("bag_id", bag_id, refund.bag_id),
        ):
            if got is not None and got != asked:
                raise _format_error(
                    resp,
                    "GET",
                    path,
                    f"the answer names {field} {got}, not {asked}: it is another refund's",
                    f"$.{field}",
                )
        return refund

    return parse


def named(refund: OrderRefund) -> OrderRefund:
    """``refund`` with an ``id`` or ``bag_id`` of 0 or below read as none given (no id:
    a backend's default for a field it never set). Records sharing id 0 were taken for
    one refund listed twice, and a refund of bag 0 for another bag's (review 18: both
    proved an ask's own refund absent)."""
    refund_id, bag_id = refund.id, refund.bag_id
    if (refund_id is None or refund_id > 0) and (bag_id is None or bag_id > 0):
        return refund
    return attrs.evolve(
        refund,
        id=None if refund_id is not None and refund_id <= 0 else refund_id,
        bag_id=None if bag_id is not None and bag_id <= 0 else bag_id,
    )


def with_request_id(refund: OrderRefund, headers: Mapping[str, str]) -> OrderRefund:
    """Stamp Violet's request id (when the answer had one) on a refund just built (its
    ids read by :func:`named`)."""
    refund = named(refund)
    request_id = request_id_of(headers)
    if request_id is not None:
        object.__setattr__(refund, "request_id", request_id)
    return refund


def parse_refund(
    resp: RawResponse, path: str, *, order_id: int | None = None, bag_id: int | None = None
) -> OrderRefund:
    """A refund POST's answer. Its amount is required: a 2xx is only returned as the
    refund made when it says what was refunded (anything less is an unreadable 2xx,
    which is read back, never sent again). A refund naming another order or bag than
    the one asked (``order_id``, ``bag_id``) is not this call's: unreadable too."""
    refund = _refund_fast(resp.body)
    if refund is None:
        # Not a well-formed refund object: the general route, for its error.
        data = decode(resp.body, status=resp.status, method="POST", path=path)
        refund = structure(
            data, OrderRefund, body=resp.body, status=resp.status, method="POST", path=path
        )
    _require_amount(refund, resp, path, "$.amount")
    _require_ours(refund, resp, path, "$", order_id=order_id, bag_id=bag_id)
    return with_request_id(refund, resp.headers)


def _refund_fast(body: bytes) -> OrderRefund | None:
    """The happy path of a refund answer: a JSON object that structures as a refund,
    through the same generated hook as the general route (None: anything else, which
    the general route reads again to name what is wrong)."""
    try:
        data = orjson.loads(body)
        if type(data) is dict:
            return structure_order_refund(data, OrderRefund)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001, S110 - the general route reports it
        pass
    return None


def _require_amount(refund: OrderRefund, resp: RawResponse, path: str, field: str) -> None:
    if refund.amount is None:
        raise _format_error(resp, "POST", path, "the refund in the answer has no amount", field)


def _require_ours(
    refund: OrderRefund,
    resp: RawResponse,
    path: str,
    field: str,
    *,
    order_id: int | None,
    bag_id: int | None,
) -> None:
    if order_id is not None and refund.order_id is not None and refund.order_id != order_id:
        raise _format_error(
            resp,
            "POST",
            path,
            f"the refund in the answer is of order {refund.order_id}, not {order_id}",
            f"{field}.order_id",
        )
    if bag_id is not None and refund.bag_id is not None and refund.bag_id != bag_id:
        raise _format_error(
            resp,
            "POST",
            path,
            f"the refund in the answer is of bag {refund.bag_id}, not {bag_id}",
            f"{field}.bag_id",
        )


def http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header as Unix time (None when absent or unreadable)."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    stamp = when.timestamp()
    return stamp if math.isfinite(stamp) else None


@attrs.frozen
class RefundPage:
    """One answer of a bag's refunds: a bare list, or a page of a Spring page.

    ``unreadable`` counts records that were skipped because they could not be read
    (not an object, a wrong type): such a record may be anyone's refund, so a read with
    one can never prove a refund absent, nor claim one."""

    refunds: list[OrderRefund]
    server_time: float | None
    paged: bool = False
    number: int | None = None
    size: int | None = None
    total_pages: int | None = None
    total_elements: int | None = None
    last: bool | None = None
    unreadable: int = 0
    listed_late: frozenset[int] = frozenset()
    """For a whole read of every page: ids listed only on pages that counted more
    refunds than its first page (the list grew while the read ran: each may have been
    made since the read began)."""


class PagingError(ValueError):
    """Pages that cannot be followed to the end (a partial list is never the whole)."""


def next_page(first: RefundPage, page: RefundPage, pages_read: int, collected: int) -> int | None:
    """The page to ask for after ``page`` (None: that was the last). ``first`` tells how
    the server numbers pages (from 0 or 1); ``collected`` is how many distinct refunds
    were read so far. Raises PagingError when more exist but cannot be followed."""
    if not page.paged:
        return None
    base = first.number if first.number is not None else 0
    total_pages, total_elements = page.total_pages, page.total_elements
    if total_pages is not None and page.number is not None and page.number - base >= total_pages:
        total_pages = None  # fewer pages than this one: a count never filled in (0)
    if total_elements is not None and total_elements < collected:
        total_elements = None  # fewer refunds than were read: never filled in either
    if page.last is not None:
        more = not page.last
    elif total_pages is not None and page.number is not None:
        more = page.number - base + 1 < total_pages
    elif total_elements is not None:
        more = collected < total_elements
    elif page.number is None and page.size is None:
        more = False  # ``{"content": [...]}``: a wrapper of the whole list, not a page
    else:
        # A page that does not say whether more follow (no ``last``, no count): one
        # that is full, or whose size is not given, may be followed by more. Taken for
        # the whole list, it hid an ask's own refund on the next page, which was proven
        # absent and sent again (review 22). An empty page, or a shorter one, ends it.
        held = len(page.refunds) + page.unreadable
        more = held > 0 and (page.size is None or held >= page.size)
    if not more:
        if total_elements is not None and collected < total_elements:
            raise PagingError(
                f"the pages hold {collected} refunds, the server counts {total_elements}"
            )
        return None
    if page.number is None:
        raise PagingError("a page says more refunds exist but not its own number")
    if pages_read >= MAX_PAGES:
        raise PagingError(f"more than {MAX_PAGES} pages of refunds")
    return page.number + 1


def _page_flag(value: Any) -> bool | None:
    """A page's ``last``: a boolean, or its JSON spelling as a string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _page_int(data: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = data.get(name)
        if type(value) is int:
            return value
    return None


def parse_refund_page(resp: RawResponse, path: str) -> RefundPage:
    """A bare list (Violet's documented shape) or a Spring page (``content`` with
    ``last`` / ``number`` / ``size`` / ``total_pages`` / ``total_elements``, snake or
    camel case); :func:`next_page` says how to go on."""
    data = decode(resp.body, status=resp.status, method="GET", path=path)
    meta: dict[str, Any] = {}
    if isinstance(data, dict) and "content" in data:
        last = data.get("last")
        meta = {
            "paged": True,
            "number": _page_int(data, "number"),
            "size": _page_int(data, "size"),
            "total_pages": _page_int(data, "total_pages", "totalPages"),
            "total_elements": _page_int(data, "total_elements", "totalElements"),
            "last": _page_flag(last),
        }
        data = data["content"]
    if not isinstance(data, list):
        raise _format_error(
            resp, "GET", path, f"expected a list of refunds, got {type(data).__name__}", "$"
        )
    refunds, unreadable = _tolerant_refunds(data, resp, path)
    return RefundPage(refunds, http_date(resp.headers.get("Date")), **meta, unreadable=unreadable)


def _tolerant_refunds(
    items: list[Any], resp: RawResponse, path: str
) -> tuple[list[OrderRefund], int]:
    """The records of a list that can be read, and how many could not. One bad record
    (an older shape, a platform's own refund with a field of another type) must not hide
    the others: a read-back needs every readable record, and a count of the rest."""
    try:
        refunds: list[OrderRefund] = structure(
            items, list[OrderRefund], body=resp.body, status=resp.status, method="GET", path=path
        )
    except ResponseFormatError:
        pass  # at least one record cannot be read: sort them one by one
    else:
        return [named(r) for r in refunds], 0
    refunds = []
    unreadable = 0
    for item in items:
        try:
            refunds.append(
                named(
                    structure(
                        item,
                        OrderRefund,
                        body=resp.body,
                        status=resp.status,
                        method="GET",
                        path=path,
                    )
                )
            )
        except ResponseFormatError:
            unreadable += 1
    if unreadable:
        log.warning(
            "GET %s: %d of %d refund records could not be read and were skipped",
            path,
            unreadable,
            len(items),
        )
    return refunds, unreadable


def parse_refund_list(resp: RawResponse, path: str) -> list[OrderRefund]:
    """One response's refunds (pages are followed by the client)."""
    return parse_refund_page(resp, path).refunds


def parse_cancel(
    resp: RawResponse, path: str, *, bag_id: int, order_id: int | None = None
) -> OrderRefund:
    """A cancel's answer: Violet's cancellation body (202, the orders-and-checkout
    pages) or a bare refund (200, the older order-service page).

    In a cancellation body, this bag's own entry decides: ``CANCELLATION_FAILURE`` is a
    definite failure (:class:`CancellationFailedError`), a refund is the cancel's
    refund. Without an entry for this bag, only an overall ``CANCELLATION_FAILURE`` that
    lists no bag cancelled and no refund is a failure; any other answer
    (``{"status": "CANCELED", "cancelled_bags": []}``, a cancelled bag without its refund)
    is a 2xx that says too little: a :class:`ResponseFormatError`, after which the bag
    is read back, never cancelled again."""
    data = decode(resp.body, status=resp.status, method="POST", path=path)
    if not _is_cancellation(data):
        refund = structure(
            data, OrderRefund, body=resp.body, status=resp.status, method="POST", path=path
        )
        _require_amount(refund, resp, path, "$.amount")
        _require_ours(refund, resp, path, "$", order_id=order_id, bag_id=bag_id)
        return with_request_id(refund, resp.headers)
    result = structure(
        data, OrderCancellation, body=resp.body, status=resp.status, method="POST", path=path
    )
    if order_id is not None and result.order_id is not None and result.order_id != order_id:
        # Another order's cancellation (a misrouted or cached answer), as a refund of
        # another order is not this call's: read back (review 20: its failure was
        # reported as this cancel's, which had applied).
        raise _format_error(
            resp,
            "POST",
            path,
            f"the cancellation in the answer is of order {result.order_id}, not {order_id}",
            "$.order_id",
        )
    ours = [bag for bag in result.cancelled_bags if bag.bag_id == bag_id]
    if len(ours) > 1:
        raise _format_error(
            resp, "POST", path, f"bag {bag_id} is listed {len(ours)} times", "$.cancelled_bags"
        )
    if ours:
        (bag,) = ours
        if order_id is not None and bag.order_id is not None and bag.order_id != order_id:
            raise _format_error(
                resp,
                "POST",
                path,
                f"bag {bag_id}'s entry names order {bag.order_id}, not {order_id}",
                "$.cancelled_bags.order_id",
            )
        if bag.status is CancelStatus.CANCELLATION_FAILURE:
            if bag.refund is not None:
                # "Not cancelled" beside a refund: money may have moved. Never a
                # definite failure (a caller would refund again): read back.
                raise _format_error(
                    resp,
                    "POST",
                    path,
                    f"bag {bag_id} is CANCELLATION_FAILURE but carries a refund",
                    "$.cancelled_bags.refund",
                )
            raise CancellationFailedError(
                f"bag {bag_id} was not cancelled: {result.message or 'CANCELLATION_FAILURE'}",
                status=str(bag.status),
                body=resp.body,
            )
        if bag.refund is None:
            raise _format_error(
                resp,
                "POST",
                path,
                f"bag {bag_id} is {bag.status or 'listed'} but no refund was returned",
                "$.cancelled_bags.refund",
            )
        if bag.refund.bag_id is not None and bag.refund.bag_id != bag_id:
            raise _format_error(
                resp,
                "POST",
                path,
                f"bag {bag_id}'s entry carries a refund of bag {bag.refund.bag_id}",
                "$.cancelled_bags.refund.bag_id",
            )
        _require_amount(bag.refund, resp, path, "$.cancelled_bags.refund.amount")
        _require_ours(
            bag.refund, resp, path, "$.cancelled_bags.refund", order_id=order_id, bag_id=None
        )
        return with_request_id(bag.refund, resp.headers)
    contradicted = any(
        bag.refund is not None
        or bag.status is not CancelStatus.CANCELLATION_FAILURE
        or bag.bag_id is not None
        for bag in result.cancelled_bags
    )
    if result.status is CancelStatus.CANCELLATION_FAILURE and not contradicted:
        # (A "failure" listing a bag cancelled, or a refund, contradicts itself: this
        # bag may have been cancelled too. It proves nothing: read back. Nor does one
        # that names other bags only: it is their failure, and says nothing of this
        # bag's (review 20: reported as this cancel's, which had applied).)
        raise CancellationFailedError(
            f"bag {bag_id} was not cancelled: {result.message or 'CANCELLATION_FAILURE'}",
            status=str(result.status),
            body=resp.body,
        )
    raise _format_error(
        resp,
        "POST",
        path,
        f"the cancellation ({result.status}) does not list bag {bag_id}",
        "$.cancelled_bags",
    )


def _is_cancellation(data: Any) -> bool:
    """A cancellation body rather than a bare refund: it lists cancelled bags, or it has
    no amount and its status is one only a cancellation has."""
    if not isinstance(data, dict):
        return False
    if "cancelled_bags" in data:
        return True
    status = data.get("status")
    return "amount" not in data and isinstance(status, str) and CancelStatus(status).is_known
