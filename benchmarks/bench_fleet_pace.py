"""The fleet half of ``bench_pace.py --workers N``: N ``violet-async worker`` processes
on a redis-server of their own, against the FakeViolet ``bench_pace`` started (in its
process), timed from the workers' start until the ledger shows every item ended (worker
start-up, about a second, included).

Also printed: the Redis commands an item cost (``INFO commandstats`` from the workers'
start to the end, arq's own included) and redis-server's own CPU. ``FLEET_PROFILE=PATH``
runs the first worker under cProfile, its stats written to PATH as it stops."""

# ruff: noqa: S603, ASYNC220 - our own argv; a benchmark driver may block
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench_fleet import _redis

from violet_async.batch import BatchItem
from violet_async.fleet import RedisLedger, create_fleet_pool, enqueue
from violet_async.testing import FakeViolet


async def run_fleet(
    fake: FakeViolet, items: list[BatchItem], args: argparse.Namespace
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        redis_proc, url = _redis(directory)
        pool = await create_fleet_pool(url)
        fleet_key = secrets.token_hex(16)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            # A Redis that never held this fleet's ledger: no settle-window hold first.
            await RedisLedger(pool).new_fleet()
            await enqueue(pool, items, fleet_key=fleet_key)
            env = {
                **os.environ,
                "VIOLET_APP_ID": str(fake.app_id),
                "VIOLET_APP_SECRET": fake.app_secret,
                "VIOLET_USERNAME": fake.username,
                "VIOLET_PASSWORD": fake.password,
                "VIOLET_FLEET_KEY": fleet_key,
                "VIOLET_FLEET_MERCHANT_PACE": "0" if args.no_merchant_pace else "1",
            }
            command = ["-m", "violet_async", "worker", "--redis", url]
            command += ["--base-url", fake.base_url, "--concurrency", str(args.concurrency)]
            profile = os.environ.get("FLEET_PROFILE")
            await pool.config_resetstat()
            started = time.perf_counter()
            cpu0 = time.process_time()
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        *(["-m", "cProfile", "-o", profile] if profile and not n else []),
                        *command,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for n in range(args.workers)
            ]
            ledger = RedisLedger(pool)
            trace_at = 0.0
            while True:
                if os.environ.get("PACE_TRACE") and time.perf_counter() - trace_at >= 1.0:
                    trace_at = time.perf_counter()
                    lane = await pool.hgetall(f"{{violet}}:pace:{fake.app_id}:20001")
                    bucket = fake.merchant_limits.buckets.get(20001)  # type: ignore[union-attr]
                    print(
                        f"{trace_at - started:5.1f}s ok {len(bucket.allowed_at) if bucket else 0}"
                        f" 429 {bucket.limited if bucket else 0}"
                        f" lane { {k.decode(): v.decode()[:8] for k, v in lane.items()} }"
                    )
                counts = await ledger.counts()
                if counts["applied"] + counts["failed"] >= len(items):
                    break
                await asyncio.sleep(0.05)
            wall = time.perf_counter() - started
            server_cpu = time.process_time() - cpu0
            # What the items cost, from the ledger (each run adds its count as it ends:
            # the last runs' land a moment after their item shows applied).
            spent = await ledger.request_counts()
            for _ in range(20):
                await asyncio.sleep(0.1)
                again = await ledger.request_counts()
                if again == spent:
                    break
                spent = again
            stats = await pool.info("commandstats")
            redis_cpu = await pool.info("cpu")
            redis_cpu["reads"] = (await pool.info("stats"))["total_reads_processed"]
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(15)
            await pool.aclose()
            redis_proc.terminate()
            redis_proc.wait(15)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Workers and redis-server (every child of this process so far), and FakeViolet with
    # this poller: where the fleet's own time goes when the limits are not what binds.
    print(
        f"CPU: workers + redis {children.ru_utime + children.ru_stime:.1f}s, "
        f"FakeViolet + poller {server_cpu:.1f}s, wall {wall:.1f}s"
    )
    _print_redis(stats, redis_cpu, len(items))
    outcomes = collections.Counter({"succeeded": counts["applied"], "failed": counts["failed"]})
    return {
        "wall": wall,
        "outcomes": outcomes,
        "requests": spent["requests"],
        "limited_seen": spent["rate_limited"],
    }


def _print_redis(stats: dict[str, Any], cpu: dict[str, Any], items: int) -> None:
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.startswith("cmdstat_")
    }
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:40]
    print(
        f"Redis: {cpu['reads'] / items:.1f} round trips (reads) an item, "
        f"{sum(calls.values()) / items:.1f} commands an item "
        f"({', '.join(f'{k} {v / items:.2f}' for k, v in top)}); "
        f"redis-server CPU {cpu['used_cpu_user'] + cpu['used_cpu_sys']:.1f}s"
    )
