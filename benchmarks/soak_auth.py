"""Auth soak: calls for N seconds against FakeViolet with a 2-second token lifetime.

Checks that every token is renewed once (no duplicate refreshes from concurrent
calls) and that no call fails. Real clock: this is a soak, not a test.

    python benchmarks/soak_auth.py --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from violet_async import VioletError
from violet_async.testing import FakeViolet


async def soak(seconds: float, lifetime: float, concurrency: int) -> int:
    failures: Counter[str] = Counter()
    calls = 0
    async with FakeViolet(orders=200, seed=2, token_lifetime=lifetime) as fake:
        async with fake.client() as client:
            stop = time.monotonic() + seconds

            async def worker(n: int) -> None:
                nonlocal calls
                i = n
                while time.monotonic() < stop:
                    order_id, bag_id = fake.seeded[i % len(fake.seeded)]
                    i += concurrency
                    try:
                        if i % 5 == 0:
                            await client.refund_bag(order_id, bag_id, amount_refunded=1)
                        else:
                            await client.list_bag_refunds(order_id, bag_id)
                    except VioletError as exc:
                        failures[type(exc).__name__] += 1
                    calls += 1
                    await asyncio.sleep(0.005)

            await asyncio.gather(*(worker(n) for n in range(concurrency)))
            auth = client._shared.auth
        ledger = fake.ledger
        tokens_minted = ledger.logins + ledger.refreshes
        # Renewal happens at half-life, so one renewal per (lifetime / 2) of wall time.
        expected = seconds / (lifetime / 2)
        print(f"{seconds:.0f}s, token lifetime {lifetime}s, concurrency {concurrency}")
        print(f"calls {calls}, failed {sum(failures.values())} {dict(failures)}")
        print(
            f"logins {ledger.logins}, refreshes {ledger.refreshes} "
            f"(client counted {auth.logins} / {auth.refreshes}); about {expected:.0f} "
            f"renewals expected at half-life; tokens minted {tokens_minted}"
        )
        ok = not failures and ledger.logins == 1 and ledger.refreshes <= expected * 1.05 + 2
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--lifetime", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(soak(args.seconds, args.lifetime, args.concurrency)))


if __name__ == "__main__":
    main()
