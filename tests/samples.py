"""Response bodies shaped like the spec pages' examples."""

from __future__ import annotations

from typing import Any

import orjson


def refund_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": 123,
        "order_id": 11,
        "bag_id": 22,
        "merchant_id": 33,
        "app_id": 44,
        "transaction_id": 55,
        "gateway_transaction_id": "pi_123",
        "amount": 1000,
        "merchant_transfer_reversal_amount_usd": 900,
        "developer_transfer_reversal_amount_usd": 100,
        "merchant_transfer_reversal_amount_platform_currency": 880,
        "developer_transfer_reversal_amount_platform_currency": 98,
        "reason": "Customer requested refund.",
        "reason_code": "OTHER",
        "refund_currency": "USD",
        "platform_currency": "EUR",
        "status": "PROCESSING",
        "skus": [
            {
                "id": 1,
                "refund_id": 123,
                "bag_id": 22,
                "quantity_refunded": 1,
                "external_id": "sku-ext",
                "order_sku_id": 10000,
            }
        ],
        "date_created": "2023-11-07T05:31:56Z",
        "date_last_modified": "2023-11-07T05:31:56+0000",
        "external_id": "re_1",
        "errors": [
            {
                "id": 9,
                "error_code": 77,
                "error_message": "merchant platform slow",
                "resolved": True,
                "date_resolved": "2023-11-07T05:31:56.000Z",
                "date_created": "2023-11-07T05:31:56Z",
                "refund_id": 123,
            }
        ],
        "shipping": {
            "amount": 500,
            "tax_amount": 40,
            "full_refund": True,
            "discrepancy_reason": "none",
        },
        "tax_amount": 80,
    }
    body.update(overrides)
    return body


def refund_bytes(**overrides: Any) -> bytes:
    return orjson.dumps(refund_body(**overrides))
