"""``violet-async demo``: the SDK against an embedded FakeViolet with faults on."""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from ._retry import RetryEvent, RetryPolicy
from ._transport import Timeouts
from .batch import BatchItem, run_batch
from .models import CancelBagRequest, RefundBagRequest
from .testing import FakeViolet, FaultPlan

__all__ = ["run_demo"]


async def run_demo(bags: int, concurrency: int, seed: int, faults: str) -> int:
    """Refund two thirds of ``bags`` (half of them partly) and cancel the rest through
    the batch runner with a journal, then print what happened and what the server's
    ledger says. Exit 0 when nothing was refunded twice and every item ended in a
    result or a typed error."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    reconciled = 0

    def on_retry(event: RetryEvent) -> None:
        retries[type(event.cause).__name__] += 1

    # Short waits keep the demo quick. The settle windows are cut down to what this
    # FakeViolet is known to do (its late commits and list lag are bounded), the one
    # thing they must always outlast; against Violet keep RetryPolicy's defaults.
    plan = FaultPlan.named(faults, seed)
    lag = plan.quirks.list_lag or 0.0
    policy = RetryPolicy(
        initial_delay=0.02,
        max_delay=0.5,
        settle_delay=0.2,
        settle_running=plan.late_commit_delay + lag + 1.0,
        settle_lag=lag + 0.5,
        deadline=30,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        journal = Path(scratch) / "demo.journal.jsonl"
        async with FakeViolet(orders=bags, seed=seed, faults=plan) as fake:
            print(f"FakeViolet on {fake.base_url}: {bags} bags, faults={faults}")
            items = []
            for line, (order_id, bag_id) in enumerate(fake.seeded, start=1):
                if line % 3 == 0:
                    items.append(
                        BatchItem.cancel(
                            line,
                            order_id,
                            bag_id,
                            CancelBagRequest(reason="Demo: customer changed their mind"),
                        )
                    )
                    continue
                total = fake.bag(order_id, bag_id).total
                amount = None if rng.random() < 0.5 else max(1, total // 2)
                items.append(
                    BatchItem.refund(
                        line,
                        order_id,
                        bag_id,
                        RefundBagRequest(amount_refunded=amount, reason="Demo refund"),
                    )
                )
            async with fake.client(
                retry=policy,
                timeouts=Timeouts(connect=2.0, read=3.0),
                on_retry=on_retry,
            ) as client:
                async for result in run_batch(
                    client, items, concurrency=concurrency, journal=journal
                ):
                    label = f"{result.item.kind} {result.outcome}"
                    if result.error_class:
                        label += f": {result.error_class}"
                    outcomes[label] += 1
                    reconciled += result.reconciled
            fake.settle()
            ledger = fake.ledger
            doubles = ledger.double_refunds()
        journal_lines = len(journal.read_bytes().splitlines())
    elapsed = time.perf_counter() - started

    print(f"\n{bags} items in {elapsed:.2f}s through the batch runner (concurrency {concurrency})")
    for key in sorted(outcomes):
        print(f"  {key:<40} {outcomes[key]:>6}")
    print(f"  {'retries':<40} {sum(retries.values()):>6}  {dict(retries)}")
    print(f"  {'reconciled after an ambiguous failure':<40} {reconciled:>6}")
    print(f"  {'journal lines (fsynced)':<40} {journal_lines:>6}")
    print(f"  {'faults injected by the server':<40} {sum(ledger.faults.values()):>6}")
    print(f"  {'refunds recorded by the server':<40} {ledger.total_refunds:>6}")
    print(f"  {'bags refunded twice (ledger)':<40} {len(doubles):>6}")
    finished = sum(outcomes.values()) == bags
    return 0 if not doubles and finished else 1
