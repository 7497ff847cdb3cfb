"""``violet-async demo``: the SDK against an embedded FakeViolet with faults on."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

from ._client import VioletClient
from ._retry import RetryEvent, RetryPolicy
from .exceptions import VioletError
from .models import OrderRefund
from .testing import FakeViolet, FaultPlan

__all__ = ["run_demo"]


def _plan(name: str, seed: int) -> FaultPlan:
    if name == "chaos":
        return FaultPlan.chaos(seed)
    if name == "moderate":
        return FaultPlan.moderate(seed)
    return FaultPlan.none()


async def run_demo(bags: int, concurrency: int, seed: int, faults: str) -> int:
    """Refund two thirds of ``bags`` (some partly) and cancel the rest, then print what
    happened and what the server's ledger says. Exit 0 when nothing was refunded
    twice and every call ended in a result or a typed error."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    reconciled = 0
    untyped: list[BaseException] = []

    def on_retry(event: RetryEvent) -> None:
        retries[type(event.cause).__name__] += 1

    # Short waits keep the demo quick; the settle delay stays above the fake's
    # late-commit delay, as it must against a real server's commit latency.
    policy = RetryPolicy(initial_delay=0.02, max_delay=0.5, settle_delay=0.3, deadline=30)
    started = time.perf_counter()
    async with FakeViolet(orders=bags, seed=seed, faults=_plan(faults, seed)) as fake:
        print(f"FakeViolet on {fake.base_url}: {bags} bags, faults={faults}")
        async with VioletClient(
            fake.app_id,
            fake.app_secret,
            username=fake.username,
            password=fake.password,
            base_url=fake.base_url,
            retry=policy,
            on_retry=on_retry,
        ) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(index: int, order_id: int, bag_id: int) -> None:
                nonlocal reconciled
                kind = "cancel" if index % 3 == 2 else "refund"
                async with gate:
                    try:
                        refund: OrderRefund
                        if kind == "cancel":
                            refund = await client.cancel_bag(
                                order_id, bag_id, reason="Demo: customer changed their mind"
                            )
                        else:
                            bag = fake.bag(order_id, bag_id)
                            amount = None if rng.random() < 0.5 else max(1, bag.total // 2)
                            refund = await client.refund_bag(
                                order_id, bag_id, amount_refunded=amount, reason="Demo refund"
                            )
                    except VioletError as exc:
                        outcomes[f"{kind} failed: {type(exc).__name__}"] += 1
                        return
                    except Exception as exc:  # noqa: BLE001 - the demo reports, never hides
                        untyped.append(exc)
                        return
                    outcomes[f"{kind} ok"] += 1
                    reconciled += refund.reconciled

            await asyncio.gather(*(one(i, o, b) for i, (o, b) in enumerate(fake.seeded)))
        fake.settle()
        ledger = fake.ledger
        doubles = ledger.double_refunds()
    elapsed = time.perf_counter() - started

    print(f"\n{bags} calls in {elapsed:.2f}s (concurrency {concurrency})")
    for key in sorted(outcomes):
        print(f"  {key:<40} {outcomes[key]:>6}")
    print(f"  {'retries':<40} {sum(retries.values()):>6}  {dict(retries)}")
    print(f"  {'reconciled after an ambiguous failure':<40} {reconciled:>6}")
    print(f"  {'faults injected by the server':<40} {sum(ledger.faults.values()):>6}")
    print(f"  {'refunds recorded by the server':<40} {ledger.total_refunds:>6}")
    print(f"  {'bags refunded twice (ledger)':<40} {len(doubles):>6}")
    if untyped:
        print(f"untyped errors reached the caller: {untyped[:3]!r}")
    return 0 if not doubles and not untyped else 1
