"""The fleet half of ``bench_pace.py --workers N``: N ``violet-async worker`` processes
on a redis-server of their own, against the FakeViolet ``bench_pace`` started (in its
process), timed from the workers' start until the ledger shows every item ended (worker
start-up, about a second, included)."""

# ruff: noqa: S603, ASYNC220 - our own argv; a benchmark driver may block
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from arq.connections import RedisSettings, create_pool
from bench_fleet import _redis

from violet_async.batch import BatchItem
from violet_async.fleet import RedisLedger, enqueue
from violet_async.testing import FakeViolet


async def run_fleet(
    fake: FakeViolet, items: list[BatchItem], args: argparse.Namespace
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        redis_proc, url = _redis(directory)
        pool = await create_pool(RedisSettings.from_dsn(url))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            await enqueue(pool, items)
            env = {
                **os.environ,
                "VIOLET_APP_ID": str(fake.app_id),
                "VIOLET_APP_SECRET": fake.app_secret,
                "VIOLET_USERNAME": fake.username,
                "VIOLET_PASSWORD": fake.password,
                "VIOLET_FLEET_MERCHANT_PACE": "0" if args.no_merchant_pace else "1",
            }
            command = [sys.executable, "-m", "violet_async", "worker", "--redis", url]
            command += ["--base-url", fake.base_url, "--concurrency", str(args.concurrency)]
            started = time.perf_counter()
            procs = [
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                for _ in range(args.workers)
            ]
            ledger = RedisLedger(pool)
            while True:
                counts = await ledger.counts()
                if counts["applied"] + counts["failed"] >= len(items):
                    break
                await asyncio.sleep(0.05)
            wall = time.perf_counter() - started
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(15)
            await pool.aclose()
            redis_proc.terminate()
            redis_proc.wait(15)
    outcomes = collections.Counter({"succeeded": counts["applied"], "failed": counts["failed"]})
    return {"wall": wall, "outcomes": outcomes, "requests": None, "limited_seen": None}
