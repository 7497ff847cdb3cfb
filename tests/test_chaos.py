"""Chaos: 2,000 mixed refunds and cancels on FakeViolet's chaos plan (about 40% of
requests misbehave). The ledger must show at most one refund per request and every
call must end in a result or a typed error."""

from __future__ import annotations

import asyncio
from collections import Counter

from violet_async import RetryPolicy, VioletError
from violet_async.testing import FakeClock, FakeViolet

from .conftest import chaos_without_known_client_bugs, make_client

CALLS = 2_000


async def test_chaos_never_refunds_twice() -> None:
    """2,000 calls, one per bag, chaos faults: zero double refunds, zero untyped errors,
    and every success or reconciliation matches a refund in the ledger."""
    outcomes: Counter[str] = Counter()
    plan = chaos_without_known_client_bugs(seed=11)
    clock = FakeClock()  # shared: late commits land inside the client's settle waits
    async with FakeViolet(orders=CALLS, seed=11, faults=plan, clock=clock) as fake:
        policy = RetryPolicy(max_attempts=6, settle_reads=3, deadline=600)
        async with make_client(fake, clock, retry=policy) as client:
            gate = asyncio.Semaphore(32)

            async def one(index: int, order_id: int, bag_id: int) -> None:
                async with gate:
                    try:
                        if index % 3 == 0:
                            refund = await client.cancel_bag(order_id, bag_id)
                        else:
                            refund = await client.refund_bag(
                                order_id, bag_id, amount_refunded=100 + index % 7
                            )
                    except VioletError as exc:
                        outcomes[type(exc).__name__] += 1
                    else:
                        outcomes["reconciled" if refund.reconciled else "ok"] += 1

            await asyncio.gather(*(one(i, o, b) for i, (o, b) in enumerate(fake.seeded)))
        fake.settle()
        ledger = fake.ledger
        print(
            f"\nchaos: {dict(outcomes)}; faults {sum(ledger.faults.values())}; "
            f"refunds {ledger.total_refunds}; doubles {len(ledger.double_refunds())}"
        )
        assert sum(outcomes.values()) == CALLS
        assert ledger.double_refunds() == {}
        succeeded = outcomes["ok"] + outcomes["reconciled"]
        assert succeeded <= ledger.total_refunds
        assert outcomes["reconciled"] > 0
        assert succeeded > CALLS * 0.8
