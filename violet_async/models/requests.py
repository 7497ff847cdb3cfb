"""Request bodies for refund and cancel. Each validates itself on construction, so an
invalid request can never be built, let alone sent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from ..exceptions import RequestValidationError
from . import _validators as v
from .enums import ReasonCode

__all__ = ["CancelBagRequest", "RefundBagRequest", "ShippingRefund", "SkuRefund"]


@attrs.frozen
class SkuRefund:
    """Refund of one SKU line of the bag."""

    order_sku_id: int
    """ID of the order SKU (the bag line) to refund."""
    quantity_refunded: int
    """How many units to refund; at least 1."""
    amount_refunded: int | None = None
    """Amount to refund for this line, in cents; None lets Violet compute it."""

    def __attrs_post_init__(self) -> None:
        v.check_int("order_sku_id", self.order_sku_id, 1, v.MAX_ID)
        v.check_int("quantity_refunded", self.quantity_refunded, 1, v.MAX_AMOUNT)
        if self.amount_refunded is not None:
            v.check_amount("amount_refunded", self.amount_refunded)


@attrs.frozen
class ShippingRefund:
    """Refund of shipping paid on the bag."""

    amount: int
    """Shipping amount to refund, in cents."""

    def __attrs_post_init__(self) -> None:
        v.check_amount("amount", self.amount)


def _skus_tuple(value: Any) -> Any:
    # A list is accepted for convenience and frozen so the request stays immutable.
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _check_skus(value: object) -> None:
    if not isinstance(value, tuple):
        raise RequestValidationError(
            "skus", f"must be a list of SkuRefund, got {type(value).__name__}"
        )
    if not value:
        raise RequestValidationError(
            "skus", "must not be empty (leave it unset to refund every SKU)"
        )
    seen: set[int] = set()
    for index, item in enumerate(value):
        if not isinstance(item, SkuRefund):
            raise RequestValidationError(
                f"skus[{index}]", f"must be a SkuRefund, got {type(item).__name__}"
            )
        if item.order_sku_id in seen:
            raise RequestValidationError(
                f"skus[{index}].order_sku_id", f"{item.order_sku_id} appears twice"
            )
        seen.add(item.order_sku_id)


@attrs.frozen
class RefundBagRequest:
    """Body of ``POST /orders/{order_id}/bags/{bag_id}/refunds``.

    The body holds exactly the fields you pass. A field left as None is not given: it is
    omitted from the JSON body (never sent as null) and Violet applies its own default,
    documented on each field. ``RefundBagRequest()`` sends ``{}``, a full refund of the
    bag with the merchant's own notification setting.
    """

    amount_refunded: int | None = None
    """Amount to refund in cents (an int >= 1; 0 is refused: it refunds nothing).

    Violet's default when omitted: the full bag amount."""
    shipping: ShippingRefund | None = None
    """Shipping to refund.

    Violet's default when omitted: no separate shipping refund."""
    skus: Sequence[SkuRefund] | None = attrs.field(default=None, converter=_skus_tuple)
    """SKU-level refunds (a non-empty list; each ``order_sku_id`` once).

    Violet's default when omitted: every SKU of the bag is refunded."""
    reason: str | None = None
    """Custom reason message, at most 255 characters.

    Violet's default when omitted: no reason."""
    restock_items: bool | None = None
    """Restock the items; set True when the order is being returned.

    Violet's default when omitted: ``False``."""
    notify_customer: bool | None = None
    """Have the merchant's system notify the shopper of the refund.

    Violet's default when omitted: the merchant's own configuration for this feature
    (pass ``False`` to make sure the shopper is not notified)."""

    def __attrs_post_init__(self) -> None:
        # Every given field in one pass; each check names its field.
        if self.amount_refunded is not None:
            v.check_amount("amount_refunded", self.amount_refunded)
            if self.amount_refunded == 0:
                # Input that could move money is strict: 0 cents refunds nothing, and
                # is not "the whole bag" (leave it unset for that).
                raise RequestValidationError(
                    "amount_refunded",
                    "is 0: a refund of 0 cents refunds nothing; give the cents to refund, "
                    "or leave it unset to refund the whole bag",
                )
        if self.shipping is not None:
            v.check_instance("shipping", self.shipping, ShippingRefund)
        if self.skus is not None:
            _check_skus(self.skus)
        if self.reason is not None:
            v.check_reason("reason", self.reason)
        if self.restock_items is not None:
            v.check_flag("restock_items", self.restock_items)
        if self.notify_customer is not None:
            v.check_flag("notify_customer", self.notify_customer)


def _reason_code(value: object) -> object:
    # Accept the exact string value too; anything else is left for the validator,
    # which names the field.
    if isinstance(value, str) and not isinstance(value, ReasonCode):
        return ReasonCode._member_map_.get(value, value)
    return value


@attrs.frozen
class CancelBagRequest:
    """Body of ``POST /orders/{order_id}/bags/{bag_id}/cancel``.

    The body holds exactly the fields you pass. A field left as None is not given: it is
    omitted from the JSON body (never sent as null) and Violet applies its own default,
    documented on each field. ``CancelBagRequest()`` sends ``{}``.
    """

    reason_code: ReasonCode | None = attrs.field(default=None, converter=_reason_code)
    """Code that best represents the reason: a `ReasonCode` or its exact string value
    (``"CUSTOMER"``).

    Violet's default when omitted: ``OTHER``."""
    reason: str | None = None
    """Custom message describing the reason, at most 255 characters.

    Violet's default when omitted: no reason."""
    restock_items: bool | None = None
    """Restock the items.

    Violet's default when omitted: ``True`` (only unfulfilled bags can be cancelled)."""
    notify_customer: bool | None = None
    """Have the merchant's system notify the shopper of the cancellation.

    Violet's default when omitted: ``False``."""

    def __attrs_post_init__(self) -> None:
        # Every given field in one pass; each check names its field.
        if self.reason_code is not None:
            v.check_known_member("reason_code", self.reason_code, ReasonCode)
        if self.reason is not None:
            v.check_reason("reason", self.reason)
        if self.restock_items is not None:
            v.check_flag("restock_items", self.restock_items)
        if self.notify_customer is not None:
            v.check_flag("notify_customer", self.notify_customer)
