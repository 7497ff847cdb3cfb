"""Refund one SKU line of a bag, cancel another bag, and close the client yourself.

A long-lived client (one per web app or worker) is built once and closed with
``aclose()`` at shutdown, instead of an ``async with`` block per call.

    python examples/refund_and_cancel.py                  # embedded FakeViolet
    VIOLET_APP_ID=... python examples/refund_and_cancel.py 100002 200002 100003 200003
"""

from __future__ import annotations

import asyncio
import os
import sys

from violet_async import ReasonCode, RefundBagRequest, SkuRefund, VioletClient
from violet_async.testing import FakeViolet


async def refund_and_cancel(client: VioletClient, ids: list[int]) -> None:
    order_id, bag_id, cancel_order_id, cancel_bag_id = ids
    # The order tells which SKU lines the bag has (their order_sku_id).
    order = await client.get_order(order_id)
    bag = next(b for b in order.bags if b.id == bag_id)
    line = bag.skus[0]
    request = RefundBagRequest(
        skus=[SkuRefund(order_sku_id=line.id, quantity_refunded=1)],
        reason="One item returned.",
        restock_items=True,  # given, so sent; Violet's default when omitted is False
    )
    refund = await client.refund_bag(order_id, bag_id, request)
    print(f"refunded 1 x SKU {line.id} on bag {bag_id}: {refund.amount} cents ({refund.status})")

    cancelled = await client.cancel_bag(
        cancel_order_id, cancel_bag_id, reason_code=ReasonCode.CUSTOMER, notify_customer=True
    )
    print(f"cancelled bag {cancel_bag_id}: refund {cancelled.id} of {cancelled.amount} cents")


async def main(ids: list[int]) -> None:
    if os.environ.get("VIOLET_APP_ID"):
        client = VioletClient.from_env()
        try:
            await refund_and_cancel(client, ids)
        finally:
            await client.aclose()
    else:
        async with FakeViolet(orders=10, seed=1) as fake:
            client = fake.client()
            try:
                await refund_and_cancel(client, ids)
            finally:
                await client.aclose()


if __name__ == "__main__":
    ids = [int(arg) for arg in sys.argv[1:5]] if len(sys.argv) > 4 else []
    asyncio.run(main(ids or [100002, 200002, 100003, 200003]))
