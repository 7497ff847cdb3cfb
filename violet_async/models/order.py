"""An order with its bags, as ``GET /orders/{order_id}`` and webhooks carry it.

Read tolerantly: only the order's and bags' ids are required (a bag is found by its
id); unknown keys are ignored and unknown bag statuses kept. There is no refunded
quantity on a SKU: Violet does not send one (its lines carry ``quantity_fulfilled``
and ``status``); what was refunded is in the bag's refund records.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from .enums import BagStatus

__all__ = ["Order", "OrderBag", "OrderSku"]


@attrs.frozen
class OrderSku:
    """One line of a bag."""

    id: int | None = None
    """ID of the order SKU (what ``SkuRefund.order_sku_id`` refers to)."""
    quantity: int | None = None
    """Units ordered."""
    price: int | None = None
    """Unit price, in cents."""
    name: str | None = None
    """Product name."""
    quantity_fulfilled: int | None = None
    """Units fulfilled (shipped) so far."""
    status: str | None = None
    """The line's status, e.g. PROCESSING, SHIPPED, CANCELED, REFUNDED (kept as sent)."""
    sku_id: int | None = None
    """ID of the SKU in Violet's catalog."""
    external_id: str | None = None
    """ID of the SKU on the merchant's platform."""


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
