"""Fleet throughput: 10,000 refunds through 1, 2 and 3 ``violet-async worker`` processes.

Each run starts its own redis-server (AOF, ``appendfsync always``: the durability the
ledger needs) and its own ``violet-async fake-server`` (faults off, in its own process),
enqueues N refunds, starts the workers and times until the ledger shows every item
applied. Run: ``python benchmarks/bench_fleet.py [N]`` (needs the ``fleet`` extra and
redis-server). Prints one line per worker count.
"""

# ruff: noqa: S603, ASYNC220 - our own argv; a benchmark driver may block
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from violet_async.batch import BatchItem
from violet_async.fleet import RedisLedger, create_fleet_pool, enqueue
from violet_async.models import RefundBagRequest
from violet_async.testing import read_banner


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    port = _port()
    proc = subprocess.Popen(
        [
            binary,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            directory,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def _fake_server(orders: int) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "violet_async",
            "fake-server",
            "--port",
            str(_port()),
            "--orders",
            str(orders),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, read_banner(iter(proc.stdout.readline, ""))


async def _run(n: int, workers: int, concurrency: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as directory:
        redis_proc, url = _redis(directory)
        fake, info = _fake_server(n)
        procs: list[subprocess.Popen[bytes]] = []
        pool = await create_fleet_pool(url)  # JSON jobs: workers refuse pickled ones
        fleet_key = secrets.token_hex(16)  # items are signed; workers check it
        try:
            items = (
                BatchItem.refund(
                    line, order, order + 100_000, RefundBagRequest(amount_refunded=500)
                )
                for line, order in enumerate(range(100001, 100001 + n), start=1)
            )
            await RedisLedger(pool).new_fleet()  # a throwaway Redis: nothing in flight
            started = time.perf_counter()
            await enqueue(pool, items, fleet_key=fleet_key)
            enqueue_s = time.perf_counter() - started
            env = {
                **os.environ,
                "VIOLET_APP_ID": info["app_id"],
                "VIOLET_APP_SECRET": info["app_secret"],
                "VIOLET_USERNAME": info["username"],
                "VIOLET_PASSWORD": info["password"],
                "VIOLET_FLEET_KEY": fleet_key,
            }
            started = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "violet_async",
                        "worker",
                        "--redis",
                        url,
                        "--base-url",
                        info["base_url"],
                        "--concurrency",
                        str(concurrency),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(workers)
            ]
            ledger = RedisLedger(pool)
            while True:
                counts = await ledger.counts()
                if counts["applied"] + counts["failed"] >= n:
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            assert counts["applied"] == n, counts
            return enqueue_s, elapsed
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(15)
            await pool.aclose()
            fake.send_signal(signal.SIGINT)
            fake.wait(15)
            redis_proc.terminate()
            redis_proc.wait(15)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    concurrency = 16
    print(f"fleet: {n} refunds, --concurrency {concurrency} per worker, {os.cpu_count()} cores")
    print("(time includes worker start-up, ~1 s; FakeViolet and redis share the cores)")
    for workers in (1, 2, 3):
        enqueue_s, elapsed = asyncio.run(_run(n, workers, concurrency))
        print(
            f"workers={workers}: {n / elapsed:7.0f} refunds/s ({elapsed:.1f} s; "
            f"enqueue {n / enqueue_s:.0f} items/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
