"""`violet-async audit` at scale: a refund file of N rows against FakeViolet (in its own
process, one bag per row, each bag already holding its row's refund, a few bags holding
a double, none, or another amount), the console script run twice (N/10 rows, then N),
each in its own process: wall time, rows/s and peak RSS, to show memory stays flat.

    python benchmarks/bench_audit.py [--rows 100000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from violet_async.testing import FakeViolet

#: Every EVERY-th bag is a special case: +1 a double, +2 missing, +3 another amount.
EVERY = 1000


async def serve(rows: int) -> None:
    """The child: FakeViolet with ``rows`` orders, each bag refunded as its row asks."""
    async with FakeViolet(orders=rows, seed=1) as fake:
        for n, (order_id, bag_id) in enumerate(fake.seeded):
            case = n % EVERY
            if case == 2:
                continue  # missing
            amount = 99 if case == 3 else 100
            fake.another_actor_refund(order_id, bag_id, amount, reason="incident 42")
            if case == 1:
                fake.another_actor_refund(order_id, bag_id, 100, reason="incident 42")
        info = {
            "base_url": fake.base_url,
            "app_id": fake.app_id,
            "app_secret": fake.app_secret,
            "username": fake.username,
            "password": fake.password,
            "pairs": fake.seeded,
        }
        sys.stdout.buffer.write(orjson.dumps(info) + b"\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def audit(info: dict[str, object], path: Path, concurrency: int) -> None:
    env = {
        **os.environ,
        "VIOLET_BASE_URL": str(info["base_url"]),
        "VIOLET_APP_ID": str(info["app_id"]),
        "VIOLET_APP_SECRET": str(info["app_secret"]),
        "VIOLET_USERNAME": str(info["username"]),
        "VIOLET_PASSWORD": str(info["password"]),
    }
    output = path.with_suffix(".audit.jsonl")
    script = Path(sys.executable).with_name("violet-async")
    argv = [str(script), "audit", str(path), "--output", str(output)]
    argv += ["--concurrency", str(concurrency)]
    started = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    verdicts: Counter[str] = Counter()
    with output.open("rb") as handle:
        for line in handle:
            verdicts[orjson.loads(line)["audit"]] += 1
    rows = sum(verdicts.values())
    print(
        f"audit {rows:>8,} rows, concurrency {concurrency}: {elapsed:6.1f}s "
        f"({rows / elapsed:,.0f} rows/s), peak RSS {usage.ru_maxrss / 1024:.0f} MB, "
        f"exit {proc.returncode}, verdicts {dict(sorted(verdicts.items()))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return
    server = subprocess.Popen(  # noqa: S603 - our own argv, no shell
        [sys.executable, __file__, "--serve", str(args.rows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        info = orjson.loads(server.stdout.readline())
        pairs = info["pairs"]
        with tempfile.TemporaryDirectory() as scratch:
            for count in (max(len(pairs) // 10, 1), len(pairs)):
                path = Path(scratch) / f"rows-{count}.csv"
                with path.open("w") as handle:
                    handle.write("order_id,bag_id,amount_refunded,reason\n")
                    for order_id, bag_id in pairs[:count]:
                        handle.write(f"{order_id},{bag_id},100,incident 42\n")
                audit(info, path, args.concurrency)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
