"""A batch across many merchants, one of them strict: how close to the ideal it ends.

Violet passes each merchant platform's 429s through. FakeViolet here lets one merchant
(20001) through at ``--strict-rate`` refunds/s and every other at ``--rate-others``, each a
token bucket of one token; over it, a 429 with the seconds until the next token. Rows are
interleaved across merchants, as an export sorted by date would mix them.

The ideal run takes as long as the slowest merchant needs: its rows / its rate. Printed:
wall time as a ratio of that, 429s (all, and the strict merchant's), rows not succeeded,
and requests per row::

    python benchmarks/bench_pace.py                         # 20 merchants x 40 rows
    python benchmarks/bench_pace.py --merchants 200 --rows 10000
    python benchmarks/bench_pace.py --merchant-column       # rows say their merchant
    python benchmarks/bench_pace.py --workers 3             # a fleet (needs redis-server)

Goal: every row succeeded, within 1.3x of the ideal, the strict merchant's 429s at most
a quarter of its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from typing import Any

from violet_async import VioletClient
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeViolet

STRICT = 20001


def _items(fake: FakeViolet, *, merchant_column: bool) -> list[BatchItem]:
    items = []
    for line, (order_id, bag_id) in enumerate(fake.seeded, 1):
        merchant = fake.bag(order_id, bag_id).merchant_id if merchant_column else None
        items.append(BatchItem.refund(line, order_id, bag_id, merchant_id=merchant))
    return items


async def _batch(fake: FakeViolet, args: argparse.Namespace) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    requests = limited = 0
    async with VioletClient(
        fake.app_id,
        fake.app_secret,
        username=fake.username,
        password=fake.password,
        base_url=fake.base_url,
    ) as client:
        started = time.perf_counter()
        async for result in run_batch(
            client,
            _items(fake, merchant_column=args.merchant_column),
            concurrency=args.concurrency,
        ):
            outcomes[result.outcome] += 1
            requests += result.requests
            limited += result.rate_limited
        wall = time.perf_counter() - started
    return {"wall": wall, "outcomes": outcomes, "requests": requests, "limited_seen": limited}


async def _fleet(fake: FakeViolet, args: argparse.Namespace) -> dict[str, Any]:
    from bench_fleet_pace import run_fleet

    return await run_fleet(fake, _items(fake, merchant_column=args.merchant_column), args)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merchants", type=int, default=20)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--strict-rate", type=float, default=2.0)
    parser.add_argument("--rate-others", type=float, default=25.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--merchant-column", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="a fleet of N workers")
    parser.add_argument(
        "--no-merchant-pace", action="store_true", help="fleet workers without per-merchant pace"
    )
    parser.add_argument(
        "--no-limits", action="store_true", help="the same rows with no limit: this machine's floor"
    )
    args = parser.parse_args(argv)
    limits: dict[str, Any] = {
        "merchant_limits": {STRICT: args.strict_rate},
        "merchant_limit": args.rate_others,
    }
    async with FakeViolet(
        orders=args.rows,
        seed=26,
        merchants=args.merchants,
        **({"merchant_limit": 1e9} if args.no_limits else limits),
    ) as fake:
        run = _fleet if args.workers else _batch
        got = await run(fake, args)
        limits = fake.merchant_limits
        assert limits is not None
        strict_rows = sum(1 for o, b in fake.seeded if fake.bag(o, b).merchant_id == STRICT)
        ideal = strict_rows / args.strict_rate
        strict_bucket = limits.buckets.get(STRICT)
        strict_429 = strict_bucket.limited if strict_bucket is not None else 0
        # The strict merchant's own span, first send to last, against its ideal: how
        # well its lane was used, start-up and the other merchants' rows aside.
        sent_at = strict_bucket.allowed_at if strict_bucket is not None else []
        lane = (
            (sent_at[-1] - sent_at[0]) / ((len(sent_at) - 1) / args.strict_rate)
            if len(sent_at) > 1
            else float("nan")
        )
        doubles = len(fake.ledger.double_refunds())
        # First refund let through to the last, over every merchant: the run without
        # its start-up (a fleet's worker processes starting, about 1-4 s here).
        allowed = [b.allowed_at for b in limits.buckets.values() if b.allowed_at]
        sends_span = (
            max(a[-1] for a in allowed) - min(a[0] for a in allowed) if allowed else float("nan")
        )
    outcomes = got["outcomes"]
    requests = "n/a" if got["requests"] is None else f"{got['requests'] / args.rows:.2f}"
    failed = args.rows - outcomes["succeeded"]
    print(
        f"{args.merchants} merchants x {args.rows // args.merchants} rows"
        f"{f', {args.workers} workers' if args.workers else ''}"
        f"{', merchant_id column' if args.merchant_column else ''}: "
        f"wall {got['wall']:.1f}s, ideal {ideal:.1f}s, ratio {got['wall'] / ideal:.2f}x "
        f"(first send to last {sends_span / ideal:.2f}x; "
        f"strict merchant's own span {lane:.2f}x); "
        f"429s {limits.limited} (strict merchant {strict_429} of its {strict_rows} rows); "
        f"rows not succeeded {failed} {dict(outcomes)}; "
        f"requests/row {requests}; doubles {doubles}"
    )
    return 0 if failed == 0 and doubles == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
