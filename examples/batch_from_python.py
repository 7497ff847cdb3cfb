"""Refund many bags from Python with bounded concurrency and a crash-safe journal.

Run the script twice with the same journal and the second run sends nothing: every item
is already done. (The command line does the same from a CSV: `violet-async refund FILE`.)

    python examples/batch_from_python.py                  # embedded FakeViolet
    VIOLET_APP_ID=... python examples/batch_from_python.py 100005 100006 100007
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from violet_async import RefundBagRequest, VioletClient
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeViolet


@contextlib.asynccontextmanager
async def violet() -> AsyncIterator[VioletClient]:
    """A client from VIOLET_* variables, or on an embedded FakeViolet when none are set."""
    if os.environ.get("VIOLET_APP_ID"):
        async with VioletClient.from_env() as client:
            yield client
    else:
        async with FakeViolet(orders=10, seed=1) as fake, fake.client() as client:
            yield client


async def refund_all(client: VioletClient, order_ids: list[int], journal: Path) -> Counter[str]:
    # FakeViolet and fake-server give order 1000NN the bag 2000NN.
    items = (
        BatchItem.refund(line, order_id, order_id + 100_000, RefundBagRequest(amount_refunded=500))
        for line, order_id in enumerate(order_ids, start=1)
    )
    outcomes: Counter[str] = Counter()
    async for result in run_batch(client, items, concurrency=4, journal=journal):
        outcomes[result.outcome] += 1
        print(
            f"line {result.item.line}: bag {result.item.bag_id} {result.outcome}"
            f" refund={result.refund_id} error={result.error_class}"
        )
    return outcomes


async def main(order_ids: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        journal = Path(folder) / "refunds.journal.jsonl"
        async with violet() as client:
            first = await refund_all(client, order_ids, journal)
            again = await refund_all(client, order_ids, journal)  # a resumed run
        print(f"first run: {dict(first)}; second run: {dict(again)}")


if __name__ == "__main__":
    order_ids = [int(arg) for arg in sys.argv[1:]] or [100005, 100006, 100007, 100008, 100009]
    asyncio.run(main(order_ids))
