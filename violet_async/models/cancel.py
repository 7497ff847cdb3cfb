"""The cancellation body Violet answers a bag cancel with (202 on the
orders-and-checkout pages; the older order-service page shows a bare refund on 200).

Every field is optional, as in Violet's OpenAPI. Each bag carries its own status:
``CANCELED``, or ``CANCELLATION_FAILURE`` for a bag the platform would not cancel.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from .enums import CancelStatus
from .refund import OrderRefund

__all__ = ["BagCancellation", "OrderCancellation"]


@attrs.frozen
class BagCancellation:
    """One bag's part of a cancellation."""

    bag_id: int | None = None
    """ID of the bag."""
    order_id: int | None = None
    """ID of the order."""
    merchant_id: int | None = None
    """ID of the bag's merchant."""
    external_order_id: str | None = None
    """ID of the order on the merchant's platform."""
    status: CancelStatus | None = None
    """This bag's outcome: CANCELED, or CANCELLATION_FAILURE (unknown values kept)."""
    originated_by: str | None = None
    """Who initiated the cancel."""
    date_cancelled: datetime | None = None
    """When the bag was cancelled."""
    refund: OrderRefund | None = None
    """The refund the cancel produced."""


@attrs.frozen
class OrderCancellation:
    """``{order_id, app_id, status, cancelled_bags, message}``."""

    status: CancelStatus | None = None
    """CANCELED, PARTIALLY_CANCELED or CANCELLATION_FAILURE (unknown values kept)."""
    order_id: int | None = None
    """ID of the order."""
    app_id: int | None = None
    """ID of the app."""
    cancelled_bags: tuple[BagCancellation, ...] = ()
    """The bags the cancel touched."""
    message: str | None = None
    """Violet's message, mostly set on failure."""
