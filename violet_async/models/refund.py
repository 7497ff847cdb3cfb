"""The Order Refund resource, as returned by refund, cancel and the refunds list."""

from __future__ import annotations

from datetime import datetime

import attrs

from .enums import ReasonCode, RefundStatus

__all__ = ["OrderRefund", "RefundError", "RefundShipping", "RefundedSku"]


@attrs.frozen
class RefundedSku:
    """One refunded order SKU."""

    id: int | None = None
    """ID of this refunded-SKU record."""
    refund_id: int | None = None
    """ID of the refund it belongs to."""
    bag_id: int | None = None
    """ID of the bag."""
    order_sku_id: int | None = None
    """ID of the order SKU refunded."""
    quantity_refunded: int | None = None
    """Units refunded."""
    external_id: str | None = None
    """ID on the external commerce platform."""


@attrs.frozen
class RefundError:
    """An error Violet recorded while processing a refund."""

    id: int | None = None
    """ID of the error record."""
    error_code: int | None = None
    """Violet's error code."""
    error_message: str | None = None
    """Human-readable description."""
    resolved: bool | None = None
    """Whether the error has been resolved."""
    date_resolved: datetime | None = None
    """When it was resolved."""
    date_created: datetime | None = None
    """When it was recorded."""
    refund_id: int | None = None
    """ID of the refund it belongs to."""


@attrs.frozen
class RefundShipping:
    """Refunded shipping amounts."""

    amount: int | None = None
    """Shipping refunded, in cents."""
    tax_amount: int | None = None
    """Tax on the shipping refunded, in cents."""
    full_refund: bool | None = None
    """Whether all shipping was refunded."""
    discrepancy_reason: str | None = None
    """Why the shipping refunded differs from what was asked, if it does."""


@attrs.frozen
class OrderRefund:
    """A refund on an order's bag (Violet's "Order Refund").

    Every field read from the wire is optional, as in Violet's own OpenAPI (its
    generated violet-swift SDK makes every property optional): refunds made on the
    merchant's platform (``EXTERNAL``) and older records leave ids and amounts out, and
    the spec pages' "required" badges are not a promise a record keeps. What a decision
    needs (an amount to match a request) is checked where that decision is made.
    """

    order_id: int | None = None
    """ID of the order being refunded."""
    merchant_id: int | None = None
    """ID of the merchant making the refund."""
    app_id: int | None = None
    """ID of the app that created the order."""
    transaction_id: int | None = None
    """ID of the transaction being refunded."""
    gateway_transaction_id: str | None = None
    """ID of the transaction in the payment gateway (Violet's own examples leave it out,
    and refunds made on the merchant's platform have none)."""
    amount: int | None = None
    """Amount refunded, in cents. None only on a record that did not carry it: such a
    record is never claimed as a request's refund (a person looks)."""
    id: int | None = None
    """ID of the refund."""
    bag_id: int | None = None
    """ID of the bag refunded."""
    merchant_transfer_reversal_amount_usd: int | None = None
    """Taken back from the merchant's transfer, in US cents."""
    developer_transfer_reversal_amount_usd: int | None = None
    """Taken back from the developer's transfer, in US cents."""
    merchant_transfer_reversal_amount_platform_currency: int | None = None
    """Taken back from the merchant's transfer, in the platform currency's minor unit."""
    developer_transfer_reversal_amount_platform_currency: int | None = None
    """Taken back from the developer's transfer, in the platform currency's minor unit."""
    reason: str | None = None
    """Reason for the refund."""
    reason_code: ReasonCode | None = None
    """Reason code for the refund (unknown codes are kept)."""
    refund_currency: str | None = None
    """Currency set for the refund by the external platform."""
    platform_currency: str | None = None
    """Currency of the platform account that processed the refund."""
    status: RefundStatus | None = None
    """Status of the refund (unknown statuses are kept)."""
    skus: tuple[RefundedSku, ...] = ()
    """SKUs the refund applies to."""
    date_created: datetime | None = None
    """When the refund was created (timezone-aware)."""
    date_last_modified: datetime | None = None
    """When the refund was last updated (timezone-aware)."""
    external_id: str | None = None
    """ID of the refund on the external platform, where it supports one."""
    errors: tuple[RefundError, ...] = ()
    """Errors recorded while processing; may be non-empty on a 2xx answer."""
    shipping: RefundShipping | None = None
    """Refunded shipping amounts."""
    tax_amount: int | None = None
    """Tax refunded, in cents."""
    payment_transaction_id: int | None = None
    """ID of the payment transaction in Violet (the orders-and-checkout pages)."""
    reconciled: bool = attrs.field(default=False, kw_only=True)
    """Set by the SDK, never read from the wire: True when this refund was found by
    reading the bag back after an ambiguous failure, rather than from the POST answer."""
    request_id: str | None = attrs.field(default=None, kw_only=True)
    """Set by the SDK, never read from the body: Violet's request id of the answer that
    returned this refund, when its headers carried one."""
