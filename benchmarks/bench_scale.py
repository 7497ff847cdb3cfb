"""Scale figures: a 100,000-item batch through the runner (peak RSS, items/s) against
FakeViolet in its own process, and a token refresh under 1,000 concurrent calls.

    python benchmarks/bench_scale.py [--items 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_refund import FIRST_BAG, FIRST_ORDER, ORDERS, start_server

from violet_async import RefundBagRequest, VioletClient
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeViolet


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def items(count: int) -> Iterator[BatchItem]:
    one_cent = RefundBagRequest(amount_refunded=1)
    for line in range(1, count + 1):
        k = line % ORDERS
        yield BatchItem.refund(line, FIRST_ORDER + k, FIRST_BAG + k, one_cent)


async def batch(info: dict[str, str], count: int, concurrency: int) -> None:
    before = peak_rss_mb()
    outcomes: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as scratch:
        journal = Path(scratch) / "scale.jsonl"
        async with VioletClient(
            int(info["app_id"]),
            info["app_secret"],
            username=info["username"],
            password=info["password"],
            base_url=info["base_url"],
        ) as client:
            started = time.perf_counter()
            async for result in run_batch(
                client, items(count), concurrency=concurrency, journal=journal
            ):
                outcomes[result.outcome] += 1
            elapsed = time.perf_counter() - started
        journal_mb = journal.stat().st_size / 1e6
    print(
        f"batch: {count} items, concurrency {concurrency}: {elapsed:.1f}s, "
        f"{count / elapsed:.0f} items/s, outcomes {dict(outcomes)}"
    )
    print(
        f"batch: peak RSS {peak_rss_mb():.0f} MB (before the batch {before:.0f} MB), "
        f"journal {journal_mb:.1f} MB"
    )


async def refresh_storm() -> None:
    async with FakeViolet(orders=10, token_lifetime=2.0) as fake:
        async with fake.client() as client:
            await client.list_bag_refunds(*fake.seeded[0])
            await asyncio.sleep(1.05)  # past half-life: the next call renews
            fake.token_lifetime = 3600.0
            started = time.perf_counter()
            await asyncio.gather(
                *(client.list_bag_refunds(*fake.seeded[i % 10]) for i in range(1000))
            )
            elapsed = time.perf_counter() - started
        print(
            f"refresh: 1,000 concurrent calls over an expiring token: {elapsed:.2f}s, "
            f"logins {fake.ledger.logins}, refreshes {fake.ledger.refreshes}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(refresh_storm())
    proc, info = start_server()
    try:
        asyncio.run(batch(info, args.items, args.concurrency))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
