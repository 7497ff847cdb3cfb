"""Refund part of a bag, then list the bag's refunds.

Run as is, it starts an embedded FakeViolet. With VIOLET_* variables set it talks to
Violet or to `violet-async fake-server`; pass ORDER_ID BAG_ID to pick the bag:

    python examples/quickstart.py
    python examples/quickstart.py 100001 200001
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

from violet_async import VioletClient
from violet_async.testing import FakeViolet


@contextlib.asynccontextmanager
async def violet() -> AsyncIterator[VioletClient]:
    """A client from VIOLET_* variables, or on an embedded FakeViolet when none are set."""
    if os.environ.get("VIOLET_APP_ID"):
        async with VioletClient.from_env() as client:
            yield client
    else:
        # Seeded like `violet-async fake-server`: orders from 100001, bags from 200001.
        async with FakeViolet(orders=10, seed=1) as fake, fake.client() as client:
            yield client


async def main(order_id: int, bag_id: int) -> None:
    async with violet() as client:
        # Only the fields passed are sent: {"amount_refunded": 500, "reason": "..."}.
        # Violet applies its own defaults to the rest (notify_customer: the merchant's).
        refund = await client.refund_bag(
            order_id, bag_id, amount_refunded=500, reason="Customer requested refund."
        )
        print(f"refund {refund.id}: {refund.amount} cents on bag {bag_id}, {refund.status}")
        for each in await client.list_bag_refunds(order_id, bag_id):
            print(f"bag {bag_id} has refund {each.id} of {each.amount} cents")


if __name__ == "__main__":
    order_id, bag_id = map(int, sys.argv[1:3]) if len(sys.argv) > 2 else (100001, 200001)
    asyncio.run(main(order_id, bag_id))
