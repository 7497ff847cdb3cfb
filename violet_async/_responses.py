"""Turning raw responses into models: refunds, refund lists, and both cancel shapes."""

from __future__ import annotations

from typing import Any

from ._converter import decode, structure
from ._transport import RawResponse
from .exceptions import CancellationFailedError, ResponseFormatError
from .models import CancelStatus, Order, OrderCancellation, OrderRefund

__all__ = ["parse_cancel", "parse_order", "parse_refund", "parse_refund_list"]


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


def parse_refund(resp: RawResponse, path: str) -> OrderRefund:
    data = decode(resp.body, status=resp.status, method="POST", path=path)
    return structure(
        data, OrderRefund, body=resp.body, status=resp.status, method="POST", path=path
    )


def parse_refund_list(resp: RawResponse, path: str) -> list[OrderRefund]:
    data = decode(resp.body, status=resp.status, method="GET", path=path)
    if isinstance(data, dict) and "content" in data:
        data = data["content"]
    if not isinstance(data, list):
        raise _format_error(
            resp, "GET", path, f"expected a list of refunds, got {type(data).__name__}", "$"
        )
    refunds: list[OrderRefund] = structure(
        data, list[OrderRefund], body=resp.body, status=resp.status, method="GET", path=path
    )
    return refunds


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
