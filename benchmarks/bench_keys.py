"""What an idempotency key costs per call: refund_bag without a key, with a key in a
MemoryStore, and with a key in a SQLiteStore (WAL, synchronous=FULL: three durable
writes per call: the claim, the record of the send, the end).

FakeViolet runs in its own process (faults off) on 127.0.0.1; the three modes run in
this process in short interleaved rounds, each call on a new bag and (with a key) a new
key. Prints the median wall milliseconds per call at concurrency 1 and 16 and the
client CPU microseconds per call. Bounded: about 30 s on a quiet machine.

    python benchmarks/bench_keys.py [--calls 200] [--rounds 5] [--db /tmp/keys.db]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from violet_async import VioletClient
from violet_async.stores import MemoryStore, RecordStore, SQLiteStore
from violet_async.testing import read_banner

ORDERS = 20_000
FIRST_ORDER, FIRST_BAG = 100_001, 200_001


def start_server() -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [
            *(sys.executable, "-m", "violet_async", "fake-server"),
            *("--port", "0", "--orders", str(ORDERS), "--seed", "1"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, read_banner(iter(proc.stdout.readline, ""))


async def run(info: dict[str, str], calls: int, rounds: int, db: Path) -> dict[str, Any]:
    bags = itertools.count()
    keys = itertools.count()
    stores: dict[str, RecordStore | None] = {
        "no key": None,
        "key, MemoryStore": MemoryStore(),
        "key, SQLiteStore": SQLiteStore(db),
    }
    clients = {
        mode: VioletClient(
            int(info["app_id"]),
            info["app_secret"],
            username=info["username"],
            password=info["password"],
            base_url=info["base_url"],
            store=store,
        )
        for mode, store in stores.items()
    }
    results: dict[str, dict[int, list[tuple[float, float]]]] = {
        mode: {1: [], 16: []} for mode in clients
    }

    async def one(mode: str, client: VioletClient) -> None:
        n = next(bags) % ORDERS
        key = f"bench-{next(keys)}" if stores[mode] is not None else None
        await client.refund_bag(
            FIRST_ORDER + n, FIRST_BAG + n, amount_refunded=1, idempotency_key=key
        )

    async def round_(mode: str, client: VioletClient, concurrency: int) -> tuple[float, float]:
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(mode, client)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls

    try:
        for client in clients.values():
            await client.__aenter__()
            await round_(next(iter(clients)), client, 4)  # warm up: login, connections
        for index in range(rounds):
            order = list(clients)[index % 3 :] + list(clients)[: index % 3]
            for concurrency in (1, 16):
                for mode in order:
                    results[mode][concurrency].append(
                        await round_(mode, clients[mode], concurrency)
                    )
    finally:
        for client in clients.values():
            await client.aclose()
        for store in stores.values():
            if store is not None:
                await store.aclose()
    return {
        mode: {
            concurrency: {
                "ms_per_call": statistics.median(w for w, _ in rows) * 1e3,
                "cpu_us_per_call": statistics.median(c for _, c in rows) * 1e6,
            }
            for concurrency, rows in by_concurrency.items()
        }
        for mode, by_concurrency in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db", help="SQLite file (default: a temporary directory)")
    args = parser.parse_args()
    proc, info = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(args.db) if args.db else Path(tmp) / "keys.db"
            table = asyncio.run(run(info, args.calls, args.rounds, db))
    finally:
        proc.terminate()
        proc.wait()
    print(f"{'mode':<18} {'c=1 ms/call':>12} {'c=16 ms/call':>13} {'c=1 CPU µs':>11}")
    for mode, row in table.items():
        print(
            f"{mode:<18} {row[1]['ms_per_call']:>12.3f} {row[16]['ms_per_call']:>13.3f} "
            f"{row[1]['cpu_us_per_call']:>11.0f}"
        )


if __name__ == "__main__":
    main()
