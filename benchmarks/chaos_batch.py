"""Chaos run (not timed in CI): 10,000 refunds and 2,000 cancels through the batch
runner, with its journal, on FakeViolet's chaos plan (5xx, 429, drops before and after
commit, late commits, resets mid-body, malformed bodies). Prints attempts,
reconciliations, typed failures and the ledger check.

    python benchmarks/chaos_batch.py [--refunds 10000] [--cancels 2000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

from violet_async import CancelBagRequest, RefundBagRequest, RetryPolicy
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeViolet, FaultPlan


async def chaos(refunds: int, cancels: int, seed: int, concurrency: int) -> int:
    total = refunds + cancels
    outcomes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    attempts = reconciled = 0
    policy = RetryPolicy(initial_delay=0.01, max_delay=0.2, settle_delay=0.1, deadline=60)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        journal = Path(scratch) / "chaos.jsonl"
        async with FakeViolet(orders=total, seed=seed, faults=FaultPlan.chaos(seed)) as fake:
            items = [
                BatchItem.cancel(n, o, b, CancelBagRequest())
                if n > refunds
                else BatchItem.refund(n, o, b, RefundBagRequest(amount_refunded=100))
                for n, (o, b) in enumerate(fake.seeded, start=1)
            ]
            async with fake.client(
                retry=policy,
            ) as client:
                async for result in run_batch(
                    client, items, concurrency=concurrency, journal=journal
                ):
                    outcomes[result.outcome] += 1
                    attempts += result.attempts
                    reconciled += result.reconciled
                    if result.error_class:
                        failures[result.error_class] += 1
            fake.settle()
            ledger = fake.ledger
            final_states = Counter()
            last: dict[int, str] = {}
            import orjson

            for line in journal.read_bytes().splitlines()[1:]:
                record = orjson.loads(line)
                last[record["line"]] = record["state"]
            final_states.update(last.values())
            doubles = ledger.double_refunds()
            without_final = total - sum(final_states[s] for s in ("done", "failed", "unknown"))
    elapsed = time.perf_counter() - started
    print(f"chaos: {refunds} refunds + {cancels} cancels, seed {seed}, {elapsed:.1f}s")
    print(f"  outcomes {dict(outcomes)}")
    print(f"  typed failures {dict(failures)}")
    print(f"  sends (attempts) {attempts}, reconciled {reconciled}")
    print(f"  faults injected {sum(ledger.faults.values())}: {dict(ledger.faults)}")
    print(f"  ledger: {ledger.total_refunds} refunds, {len(doubles)} bags refunded twice")
    print(
        f"  journal final states {dict(final_states)}; items without a final state {without_final}"
    )
    ok = not doubles and without_final == 0 and sum(outcomes.values()) == total
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refunds", type=int, default=10_000)
    parser.add_argument("--cancels", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(chaos(args.refunds, args.cancels, args.seed, args.concurrency)))


if __name__ == "__main__":
    main()
