"""The cancellation body some Violet deployments answer a bag cancel with (202)."""

from __future__ import annotations

from datetime import datetime

import attrs

from .enums import BagStatus, CancelStatus
from .refund import OrderRefund

__all__ = ["BagCancellation", "OrderCancellation"]


@attrs.frozen
class BagCancellation:
    """One bag's part of a cancellation."""

    bag_id: int
    """ID of the bag."""
    external_order_id: str | None = None
    """ID of the order on the merchant's platform."""
    status: BagStatus | None = None
    """Bag status after the cancel."""
    originated_by: str | None = None
    """Who initiated the cancel."""
    date_cancelled: datetime | None = None
    """When the bag was cancelled."""
    refund: OrderRefund | None = None
    """The refund the cancel produced."""


@attrs.frozen
class OrderCancellation:
    """``{order_id, app_id, status, cancelled_bags, message}``."""

    status: CancelStatus
    """CANCELED, PARTIALLY_CANCELED or CANCELLATION_FAILURE (unknown values kept)."""
    order_id: int | None = None
    """ID of the order."""
    app_id: int | None = None
    """ID of the app."""
    cancelled_bags: tuple[BagCancellation, ...] = ()
    """The bags the cancel touched."""
    message: str | None = None
    """Violet's message, mostly set on failure."""
