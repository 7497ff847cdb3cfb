"""attrs models for requests, responses and enums."""

from .cancel import BagCancellation, OrderCancellation
from .enums import BagStatus, CancelStatus, ReasonCode, RefundStatus
from .order import Order, OrderBag, OrderSku
from .refund import OrderRefund, RefundedSku, RefundError, RefundShipping
from .requests import CancelBagRequest, RefundBagRequest, ShippingRefund, SkuRefund

__all__ = [
    "BagCancellation",
    "BagStatus",
    "CancelBagRequest",
    "CancelStatus",
    "Order",
    "OrderBag",
    "OrderCancellation",
    "OrderRefund",
    "OrderSku",
    "ReasonCode",
    "RefundBagRequest",
    "RefundError",
    "RefundShipping",
    "RefundStatus",
    "RefundedSku",
    "ShippingRefund",
    "SkuRefund",
]
