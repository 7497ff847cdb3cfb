"""Turning raw responses into models: refunds, refund lists, and both cancel shapes."""

from __future__ import annotations

import email.utils
import math
from typing import Any

import attrs

from ._converter import decode, structure
from ._transport import RawResponse
from .exceptions import CancellationFailedError, ResponseFormatError
from .models import CancelStatus, Order, OrderCancellation, OrderRefund

__all__ = [
    "RefundPage",
    "http_date",
    "parse_cancel",
    "parse_order",
    "parse_refund",
    "parse_refund_get",
    "parse_refund_list",
    "parse_refund_page",
]

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
    return structure(data, OrderRefund, body=resp.body, status=resp.status, method="GET", path=path)


def parse_refund(resp: RawResponse, path: str) -> OrderRefund:
    data = decode(resp.body, status=resp.status, method="POST", path=path)
    return structure(
        data, OrderRefund, body=resp.body, status=resp.status, method="POST", path=path
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
    """One page of a bag's refunds; ``next_page`` is None on the last (or only) page."""

    refunds: list[OrderRefund]
    next_page: int | None
    size: int | None
    server_time: float | None


def _page_int(data: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = data.get(name)
        if type(value) is int:
            return value
    return None


def parse_refund_page(resp: RawResponse, path: str) -> RefundPage:
    """A bare list (Violet's documented shape) or a Spring page (``content`` with
    ``last`` / ``number`` / ``total_pages``, snake or camel case). A page that says
    more exist but not which comes next is unreadable: a partial list must never be
    taken for the whole."""
    data = decode(resp.body, status=resp.status, method="GET", path=path)
    next_page = size = None
    if isinstance(data, dict) and "content" in data:
        number = _page_int(data, "number")
        size = _page_int(data, "size")
        total = _page_int(data, "total_pages", "totalPages")
        last = data.get("last")
        if isinstance(last, bool):
            more = not last
        elif total is not None and number is not None:
            more = number + 1 < total
        else:
            more = False
        if more:
            if number is None or number < 0 or number + 1 >= MAX_PAGES:
                raise _format_error(
                    resp, "GET", path, "a page says more refunds exist but not where", "$.number"
                )
            next_page = number + 1
        data = data["content"]
    if not isinstance(data, list):
        raise _format_error(
            resp, "GET", path, f"expected a list of refunds, got {type(data).__name__}", "$"
        )
    refunds: list[OrderRefund] = structure(
        data, list[OrderRefund], body=resp.body, status=resp.status, method="GET", path=path
    )
    return RefundPage(refunds, next_page, size, http_date(resp.headers.get("Date")))


def parse_refund_list(resp: RawResponse, path: str) -> list[OrderRefund]:
    """One response's refunds (pages are followed by the client)."""
    return parse_refund_page(resp, path).refunds


def parse_cancel(resp: RawResponse, path: str, *, bag_id: int) -> OrderRefund:
    data = decode(resp.body, status=resp.status, method="POST", path=path)
    if not ((isinstance(data, dict) and "cancelled_bags" in data) or _is_cancel_status(data)):
        return structure(
            data, OrderRefund, body=resp.body, status=resp.status, method="POST", path=path
        )
    result = structure(
        data, OrderCancellation, body=resp.body, status=resp.status, method="POST", path=path
    )
    if result.status is CancelStatus.CANCELLATION_FAILURE:
        raise CancellationFailedError(
            f"bag {bag_id} was not cancelled: {result.message or 'CANCELLATION_FAILURE'}",
            status=str(result.status),
            body=resp.body,
        )
    for bag in result.cancelled_bags:
        if bag.bag_id == bag_id:
            if bag.refund is None:
                raise _format_error(
                    resp,
                    "POST",
                    path,
                    f"bag {bag_id} is cancelled but no refund was returned",
                    "$.cancelled_bags.refund",
                )
            return bag.refund
    raise CancellationFailedError(
        f"bag {bag_id} is not among the cancelled bags ({result.status})",
        status=str(result.status),
        body=resp.body,
    )


def _is_cancel_status(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and "amount" not in data
        and isinstance(data.get("status"), str)
        and CancelStatus(data["status"]).is_known
    )
