"""Refund a few bags with a journal, then audit them from Violet's own records.

Every row comes out ``as_asked`` (its refund, made by this journal's run); a refund of a
bag that no row asked for would make that row ``extra``. (The command line does the same
from the batch's file: `violet-async audit FILE`.)

    python examples/audit_from_python.py                  # embedded FakeViolet
    VIOLET_APP_ID=... python examples/audit_from_python.py 100011 100012 100013
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
from violet_async.batch import BatchItem, audit, run_batch
from violet_async.testing import FakeViolet


@contextlib.asynccontextmanager
async def violet() -> AsyncIterator[VioletClient]:
    """A client from VIOLET_* variables, or on an embedded FakeViolet when none are set."""
    if os.environ.get("VIOLET_APP_ID"):
        async with VioletClient.from_env() as client:
            yield client
    else:
        async with FakeViolet(orders=13, seed=1) as fake, fake.client() as client:
            yield client


async def audit_run(client: VioletClient, items: list[BatchItem], journal: Path) -> Counter[str]:
    verdicts: Counter[str] = Counter()
    async for row in audit(client, items, journal=journal, concurrency=4):
        verdicts[row.audit] += 1
        print(f"line {row.item.line}: bag {row.item.bag_id} {row.audit} {row.refund_ids}")
        if row.audit != "as_asked":
            print(f"  {row.detail}")
    return verdicts


async def main(order_ids: list[int]) -> None:
    # FakeViolet and fake-server give order 1000NN the bag 2000NN.
    items = [
        BatchItem.refund(line, order_id, order_id + 100_000, RefundBagRequest(amount_refunded=300))
        for line, order_id in enumerate(order_ids, start=1)
    ]
    with tempfile.TemporaryDirectory() as folder:
        journal = Path(folder) / "refunds.journal.jsonl"
        async with violet() as client:
            async for _ in run_batch(client, items, journal=journal):
                pass
            verdicts = await audit_run(client, items, journal)
    print(f"audit: {dict(verdicts)}")


if __name__ == "__main__":
    order_ids = [int(arg) for arg in sys.argv[1:]] or [100011, 100012, 100013]
    asyncio.run(main(order_ids))
