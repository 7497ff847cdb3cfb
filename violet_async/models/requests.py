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

    order_sku_id: int = attrs.field(validator=v.positive_int(1, v.MAX_ID))
    """ID of the order SKU (the bag line) to refund."""
    quantity_refunded: int = attrs.field(validator=v.positive_int(1, v.MAX_AMOUNT))
    """How many units to refund; at least 1."""
    amount_refunded: int | None = attrs.field(default=None, validator=v.amount(optional=True))
    """Amount to refund for this line, in cents; None lets Violet compute it."""


@attrs.frozen
class ShippingRefund:
    """Refund of shipping paid on the bag."""

    amount: int = attrs.field(validator=v.amount(optional=False))
    """Shipping amount to refund, in cents."""


def _skus_tuple(value: Any) -> Any:
    # A list is accepted for convenience and frozen so the request stays immutable.
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _validate_skus(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple):
        raise RequestValidationError(
            attribute.name, f"must be a list of SkuRefund, got {type(value).__name__}"
        )
    if not value:
        raise RequestValidationError(
            attribute.name, "must not be empty (leave it unset to refund every SKU)"
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

    Fields left as None are omitted from the JSON body (never sent as null), so Violet
    applies its own default: the full bag amount, every SKU, and for
    ``notify_customer=None`` the merchant's own setting.
    """

    amount_refunded: int | None = attrs.field(default=None, validator=v.amount(optional=True))
    """Amount to refund in cents; None refunds the full bag."""
    shipping: ShippingRefund | None = attrs.field(
        default=None, validator=v.instance_of(ShippingRefund, optional=True)
    )
    """Shipping to refund."""
    skus: Sequence[SkuRefund] | None = attrs.field(
        default=None, converter=_skus_tuple, validator=_validate_skus
    )
    """SKU-level refunds; None refunds every SKU."""
    reason: str | None = attrs.field(default=None, validator=v.reason)
    """Custom reason message, at most 255 characters."""
    restock_items: bool | None = attrs.field(default=False, validator=v.flag(optional=True))
    """Restock the items (set True when the order is being returned). Default False."""
    notify_customer: bool | None = attrs.field(default=False, validator=v.flag(optional=True))
    """Have the merchant's system notify the shopper. Default False; None omits the
    field so the merchant's own configuration applies."""


def _reason_code(value: object) -> object:
    # Accept the exact string value too; anything else is left for the validator,
    # which names the field.
    if isinstance(value, str) and not isinstance(value, ReasonCode):
        return ReasonCode._member_map_.get(value, value)
    return value


@attrs.frozen
class CancelBagRequest:
    """Body of ``POST /orders/{order_id}/bags/{bag_id}/cancel``."""

    reason_code: ReasonCode = attrs.field(
        default=ReasonCode.OTHER,
        converter=_reason_code,
        validator=v.known_member(ReasonCode),
    )
    """Code that best represents the reason. Default OTHER."""
    reason: str | None = attrs.field(default=None, validator=v.reason)
    """Custom message, at most 255 characters."""
    restock_items: bool = attrs.field(default=True, validator=v.flag(optional=False))
    """Restock the items. Default True (only unfulfilled bags can be cancelled)."""
    notify_customer: bool = attrs.field(default=False, validator=v.flag(optional=False))
    """Have the merchant's system notify the shopper. Default False."""
