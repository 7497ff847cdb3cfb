"""An order with its bags, as ``GET /orders/{order_id}`` and webhooks carry it.

Read tolerantly: only ids are required; unknown keys are ignored and unknown bag
statuses kept.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from .enums import BagStatus

__all__ = ["Order", "OrderBag", "OrderSku"]


@attrs.frozen
class OrderSku:
    """One line of a bag."""

    id: int
    """ID of the order SKU (what ``SkuRefund.order_sku_id`` refers to)."""
    quantity: int | None = None
    """Units ordered."""
    price: int | None = None
    """Unit price, in cents."""
    refunded_quantity: int | None = None
    """Units refunded so far, where Violet reports it."""
    name: str | None = None
    """Product name."""


@attrs.frozen
class OrderBag:
    """One merchant's part of an order."""

    id: int
    """ID of the bag."""
    status: BagStatus | None = None
    """Bag status (unknown values kept)."""
    financial_status: str | None = None
    """Payment state, e.g. PAID, PARTIALLY_REFUNDED, REFUNDED."""
    fulfillment_status: str | None = None
    """Fulfillment state, e.g. PROCESSING, FULFILLED."""
    merchant_id: int | None = None
    """ID of the merchant."""
    currency: str | None = None
    """Currency of the amounts."""
    total: int | None = None
    """Total charged for the bag, in cents."""
    sub_total: int | None = None
    """Items total, in cents."""
    shipping_total: int | None = None
    """Shipping charged, in cents."""
    tax_total: int | None = None
    """Tax charged, in cents."""
    skus: tuple[OrderSku, ...] = ()
    """The bag's lines."""


@attrs.frozen
class Order:
    """An order and its bags."""

    id: int
    """ID of the order."""
    app_id: int | None = None
    """ID of the app that created it."""
    status: str | None = None
    """Order status."""
    currency: str | None = None
    """Order currency."""
    total: int | None = None
    """Order total, in cents."""
    date_created: datetime | None = None
    """When the order was created."""
    date_last_modified: datetime | None = None
    """When it last changed."""
    bags: tuple[OrderBag, ...] = ()
    """The order's bags."""

    def bag(self, bag_id: int) -> OrderBag | None:
        """The bag with ``bag_id``, or None."""
        return next((b for b in self.bags if b.id == bag_id), None)
