"""The fleet's exactly-once pieces under a plain asyncio loop (no arq): items go into
the Redis ledger, their keys into a Redis list, and any number of these loops, on any
hosts, refund each exactly once. Uses ``VIOLET_REDIS_URL`` or starts a throwaway
redis-server, and an embedded FakeViolet plays Violet.

    pip install -e '.[fleet]'           # in a checkout of this repository
    python examples/fleet_plain_loop.py
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter

from redis.asyncio import Redis

from violet_async import RefundBagRequest, VioletClient
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetRateLimit,
    FleetWorker,
    RedisLedger,
    RetryLaterError,
    keyed_items,
)
from violet_async.testing import FakeViolet


async def plain_worker(client: VioletClient, redis: Redis, outcomes: Counter[str]) -> None:
    fleet = FleetWorker(client, RedisLedger(redis), BagLocks(redis), FleetRateLimit(redis, 1, 20))
    while popped := await redis.blpop(["refund-keys"], timeout=1):  # keys of ledger items
        key = popped[1].decode()
        try:
            outcomes[(await fleet.run(key))["state"]] += 1  # safe to run twice, anywhere
        except RetryLaterError as later:  # a settle window, a busy bag, a lost lock
            await asyncio.sleep(later.defer)
            await redis.rpush("refund-keys", key)


async def main(url: str) -> None:
    redis = Redis.from_url(url)
    async with FakeViolet(orders=5, seed=1) as fake, fake.client() as client:
        ledger = RedisLedger(redis)
        await ledger.new_fleet()  # a new ledger: no refund of it can be in flight
        request = RefundBagRequest(amount_refunded=500)
        items = [BatchItem.refund(n, 100000 + n, 200000 + n, request) for n in range(1, 6)]
        for key, item in keyed_items(items):
            if await ledger.register(key, item) is None:  # new to the ledger
                await redis.rpush("refund-keys", key)
        outcomes: Counter[str] = Counter()
        await asyncio.gather(*(plain_worker(client, redis, outcomes) for _ in range(3)))
        print(f"fleet: {dict(outcomes)}; refunds at Violet: {fake.ledger.total_refunds}")
    await redis.aclose()


def throwaway_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server") or "redis-server"
    argv = [binary, "--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    argv += ["--dir", directory, "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)  # noqa: S603 - our argv
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


if __name__ == "__main__":
    # Producers sign items and workers check them with VIOLET_FLEET_KEY (one secret for
    # the whole fleet); this demo makes a throwaway one when none is set.
    os.environ.setdefault("VIOLET_FLEET_KEY", secrets.token_hex(16))
    if os.environ.get("VIOLET_REDIS_URL"):
        asyncio.run(main(os.environ["VIOLET_REDIS_URL"]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            server, redis_url = throwaway_redis(tmp)
            try:
                asyncio.run(main(redis_url))
            finally:
                server.terminate()
                server.wait()
