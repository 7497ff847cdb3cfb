"""Chaos run (not timed in CI): 10,000 refunds and 2,000 cancels through the batch
runner, with its journal, on FakeViolet's chaos plan (5xx, 429, drops before and after
commit, gateway pages after commits, late commits, a lagging paged refund list, dates
without offsets, a skewed server clock, trimmed reasons, malformed bodies), or
``--faults hostile``.

FakeViolet and the client share one virtual clock, so 60-second settle windows cost no
real time. Prints outcomes, double refunds (the ledger's), wrong reports (an outcome
the ledger contradicts: a refund id that is not the bag's one refund, or a definite
failure on a bag that was refunded), items still unknown at the end, and the time.

    python benchmarks/chaos_batch.py [--refunds 10000] [--cancels 2000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from violet_async import CancelBagRequest, RefundBagRequest, RetryPolicy
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeClock, FakeViolet, FaultPlan


async def chaos(refunds: int, cancels: int, seed: int, concurrency: int, faults: str) -> int:
    total = refunds + cancels
    outcomes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    attempts = reconciled = wrong = 0
    clock = FakeClock()
    policy = RetryPolicy(deadline=60)
    plan = FaultPlan.named(faults, seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        journal = Path(scratch) / "chaos.jsonl"
        async with FakeViolet(orders=total, seed=seed, faults=plan, clock=clock) as fake:
            items = [
                BatchItem.cancel(n, o, b, CancelBagRequest())
                if n > refunds
                else BatchItem.refund(
                    n, o, b, RefundBagRequest(amount_refunded=100, reason=" chaos ")
                )
                for n, (o, b) in enumerate(fake.seeded, start=1)
            ]
            results = []
            async with fake.client(retry=policy, clock=clock) as client:
                async for result in run_batch(
                    client, items, concurrency=concurrency, journal=journal
                ):
                    results.append((result.item.bag_id, result.outcome, result.refund_id))
                    outcomes[result.outcome] += 1
                    attempts += result.attempts
                    reconciled += result.reconciled
                    if result.error_class:
                        failures[result.error_class] += 1
            fake.settle()
            ledger = fake.ledger
            for bag_id, outcome, refund_id in results:
                made = [
                    c.refund_id
                    for c in ledger.commits_per_bag.get(bag_id, [])
                    if c.route != "external"
                ]
                if (outcome == "succeeded" and made != [refund_id]) or (
                    outcome == "failed" and made
                ):
                    wrong += 1
            final_states: Counter[str] = Counter()
            last: dict[int, str] = {}
            for line in journal.read_bytes().splitlines()[1:]:
                record = orjson.loads(line)
                last[record["line"]] = record["state"]
            final_states.update(last.values())
            doubles = ledger.double_refunds()
            finals = ("done", "failed", "unknown", "unsent", "present")
            without_final = total - sum(final_states[s] for s in finals)
    elapsed = time.perf_counter() - started
    print(f"chaos ({faults}): {refunds} refunds + {cancels} cancels, seed {seed}")
    print(f"  wall time {elapsed:.1f}s, virtual time {clock.monotonic() - 1000.0:.0f}s")
    print(f"  outcomes {dict(outcomes)}")
    print(f"  typed failures {dict(failures)}")
    print(f"  sends (attempts) {attempts}, reconciled {reconciled}")
    print(f"  faults injected {sum(ledger.faults.values())}: {dict(ledger.faults)}")
    print(f"  ledger: {ledger.total_refunds} refunds, {len(doubles)} bags refunded twice")
    print(f"  wrong reports {wrong}, unknown at the end {outcomes['unknown']}")
    print(
        f"  journal final states {dict(final_states)}; items without a final state {without_final}"
    )
    ok = (
        not doubles
        and not wrong
        and without_final == 0
        and outcomes["unknown"] == 0
        and sum(outcomes.values()) == total
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refunds", type=int, default=10_000)
    parser.add_argument("--cancels", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--faults", default="chaos", choices=("chaos", "hostile", "moderate"))
    args = parser.parse_args()
    raise SystemExit(
        asyncio.run(chaos(args.refunds, args.cancels, args.seed, args.concurrency, args.faults))
    )


if __name__ == "__main__":
    main()
