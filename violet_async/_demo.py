"""``violet-async demo``: the SDK against an embedded FakeViolet with faults on, then
against merchant platforms with limits of their own (one strict), paced per merchant."""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from ._retry import RetryEvent, RetryPolicy
from ._transport import Timeouts
from .batch import BatchItem, run_batch
from .models import CancelBagRequest, RefundBagRequest
from .testing import FakeViolet, FaultPlan

__all__ = ["run_demo"]

#: The pacing part: bags take turns among these merchants' platforms; the first is
#: strict (as Shopify is), the others let more through. Over its limit a platform's
#: POST is answered 429, nothing applied, as Violet passes a platform's 429s through.
MERCHANTS = 4
ROWS_PER_MERCHANT = 25
STRICT_MERCHANT = 20001
STRICT_LIMIT = 10.0
OTHER_LIMIT = 100.0
#: A platform's bucket: this many POSTs at once, then its rate.
MERCHANT_BURST = 4.0


async def run_demo(bags: int, concurrency: int, seed: int, faults: str) -> int:
    """Refund two thirds of ``bags`` (half of them partly) and cancel the rest through
    the batch runner with a journal, then print what happened and what the server's
    ledger says. Exit 0 when nothing was refunded twice, every item ended in a result
    or a typed error, and the ledger contradicts no outcome (a refund or cancel
    reported made is on its bag once; one reported definitely not applied is not)."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    ended: list[tuple[int, str]] = []  # (bag, outcome)
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
                    ended.append((result.item.bag_id, result.outcome))
            fake.settle()
            ledger = fake.ledger
            doubles = ledger.double_refunds()
            contradicted = _contradicted(ended, ledger.refunds_per_bag)
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
    print(f"  {'outcomes the ledger contradicts':<40} {len(contradicted):>6}")
    finished = sum(outcomes.values()) == bags
    paced = await _pace_demo(concurrency, seed)
    return 0 if not doubles and not contradicted and finished and paced else 1


#: Outcomes that say the item's refund (or cancel) was made, and that it was not.
_MADE = frozenset({"succeeded", "already_done"})
_NOT_MADE = frozenset({"failed", "already_failed"})


def _contradicted(ended: list[tuple[int, str]], made: Mapping[int, int]) -> list[int]:
    """The bags whose reported outcome the server's ledger contradicts: reported made
    and not on the bag exactly once, or reported definitely not applied and on it.
    (Pending, review and not-sent outcomes claim nothing either way.)"""
    return [
        bag
        for bag, outcome in ended
        if (outcome in _MADE and made.get(bag, 0) != 1)
        or (outcome in _NOT_MADE and made.get(bag, 0) != 0)
    ]


async def _pace_demo(concurrency: int, seed: int) -> bool:
    """Refund bags of merchants whose platforms have limits of their own (one strict),
    faults off, and print each merchant's pace: learned from its own 429s (nothing is
    configured), a strict one slowing only its own rows. True when every row succeeded
    and no bag was refunded twice."""
    lanes: dict[int, _Lane] = {}
    failed = 0
    async with FakeViolet(
        orders=MERCHANTS * ROWS_PER_MERCHANT,
        seed=seed,
        merchants=MERCHANTS,
        merchant_limits={STRICT_MERCHANT: STRICT_LIMIT},
        merchant_limit=OTHER_LIMIT,
        merchant_burst=MERCHANT_BURST,
    ) as fake:
        merchant_of = {}
        items = []
        for line, (order_id, bag_id) in enumerate(fake.seeded, start=1):
            merchant_of[line] = fake.bag(order_id, bag_id).merchant_id or 0
            request = RefundBagRequest(reason="Demo refund")
            items.append(BatchItem.refund(line, order_id, bag_id, request))
        print(
            f"\n{len(items)} refunds of {MERCHANTS} merchants (faults off): merchant "
            f"{STRICT_MERCHANT}'s platform lets {STRICT_LIMIT:g} refunds/s through, the "
            f"others {OTHER_LIMIT:g}/s; over it, a 429 (nothing applied)"
        )
        started = time.perf_counter()
        async with fake.client() as client:
            async for result in run_batch(client, items, concurrency=concurrency):
                lane = lanes.setdefault(merchant_of[result.item.line], _Lane())
                lane.rows += 1
                lane.requests += result.requests
                lane.rate_limited += result.rate_limited
                lane.done_at = time.perf_counter() - started
                failed += result.outcome != "succeeded"
        elapsed = time.perf_counter() - started
        fake.settle()
        doubles = fake.ledger.double_refunds()
        limits = fake.merchant_limits
        assert limits is not None  # noqa: S101 - given above
        for merchant, lane in lanes.items():
            bucket = limits.bucket(merchant)
            if bucket is not None:
                lane.limit = bucket.rate
                lane.peak = bucket.max_in_window()
    ideal = max(lane.ideal for lane in lanes.values())
    print(
        f"{len(items)} refunds in {elapsed:.2f}s: {elapsed / max(ideal, 1e-9):.2f}x the ideal "
        f"{ideal:.2f}s (the strict merchant's rows at its limit); {failed} rows not succeeded, "
        f"{len(doubles)} bags refunded twice"
    )
    print(
        f"  {'merchant':<10}{'limit/s':>8}{'rows':>6}{'requests':>10}{'429s':>6}"
        f"{'peak/s':>8}{'ideal':>8}{'done at':>9}"
    )
    for merchant in sorted(lanes):
        lane = lanes[merchant]
        print(
            f"  {merchant:<10}{lane.limit:>8g}{lane.rows:>6}{lane.requests:>10}"
            f"{lane.rate_limited:>6}{lane.peak:>8}{lane.ideal:>7.2f}s{lane.done_at:>8.2f}s"
        )
    print(
        "  (requests: a baseline read and the POST a row, each 429 answered, and once the "
        "run has seen a 429, one read of the order for a row whose merchant is not known "
        "yet; peak/s: the most POSTs the platform let through in any second)"
    )
    return not failed and not doubles


class _Lane:
    """One merchant's rows in the pacing demo, and what its platform saw."""

    def __init__(self) -> None:
        self.rows = 0
        self.requests = 0
        self.rate_limited = 0
        self.done_at = 0.0
        self.limit = 0.0
        self.peak = 0

    @property
    def ideal(self) -> float:
        """The least time its rows can take at its platform's limit (its bucket's
        burst at once, then the rate)."""
        return max(self.rows - MERCHANT_BURST, 0) / self.limit if self.limit else 0.0
