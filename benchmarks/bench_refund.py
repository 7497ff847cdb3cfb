"""refund_bag throughput and client CPU: the SDK vs raw aiohttp + orjson (the limit) vs
a plain httpx + pydantic v2 client (what a user would otherwise write).

FakeViolet runs in its own process (faults off) on 127.0.0.1. Short rounds are
interleaved (SDK, raw, httpx, SDK, ...) so machine drift cancels out, and medians
are reported. Prints calls/s, client CPU
microseconds per call and the ratios, and writes the same to JSON.

    pip install -e '.[bench]'
    python benchmarks/bench_refund.py [--calls 500] [--rounds 12] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import orjson
import pydantic

from violet_async import OrderRefund, RefundBagRequest, RetryPolicy, VioletClient
from violet_async._converter import converter, encode_request
from violet_async._retry import SYSTEM_CLOCK, Retrier

ORDERS = 2000
FIRST_ORDER, FIRST_BAG = 100_001, 200_001  # FakeViolet's deterministic seeding


class PydRefund(pydantic.BaseModel):
    """What a user would write by hand for the same response."""

    model_config = pydantic.ConfigDict(extra="ignore")
    id: int | None = None
    order_id: int
    bag_id: int | None = None
    merchant_id: int
    app_id: int
    transaction_id: int
    gateway_transaction_id: str
    amount: int
    merchant_transfer_reversal_amount_usd: int | None = None
    developer_transfer_reversal_amount_usd: int | None = None
    merchant_transfer_reversal_amount_platform_currency: int | None = None
    developer_transfer_reversal_amount_platform_currency: int | None = None
    reason: str | None = None
    reason_code: str | None = None
    refund_currency: str | None = None
    platform_currency: str | None = None
    status: str | None = None
    skus: list[dict[str, Any]] = []
    date_created: Any = None
    date_last_modified: Any = None
    external_id: str | None = None
    errors: list[dict[str, Any]] = []
    shipping: dict[str, Any] | None = None
    tax_amount: int | None = None


def start_server() -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "violet_async",
            "fake-server",
            "--port",
            "0",
            "--orders",
            str(ORDERS),
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    info: dict[str, str] = {}
    while len(info) < 5:
        key, _, value = proc.stdout.readline().strip().partition("=")
        info[key] = value
    return proc, info


class Bags:
    """Hands out (order, bag) pairs round-robin; each refund takes 1 cent."""

    def __init__(self) -> None:
        self.i = 0

    def next(self) -> tuple[int, int]:
        self.i += 1
        k = self.i % ORDERS
        return FIRST_ORDER + k, FIRST_BAG + k


async def run_round(
    call: Callable[[int, int], Awaitable[Any]], bags: Bags, calls: int, concurrency: int
) -> tuple[float, float]:
    """Returns (wall seconds, client CPU seconds) for ``calls`` calls."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(*bags.next())

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - wall0, time.process_time() - cpu0


async def end_to_end(info: dict[str, str], calls: int, rounds: int) -> dict[str, Any]:
    base, app_id, secret = info["base_url"], int(info["app_id"]), info["app_secret"]
    body = orjson.dumps({"amount_refunded": 1})
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            base + "/login",
            headers={"X-Violet-App-Id": str(app_id), "X-Violet-App-Secret": secret},
            data=orjson.dumps({"username": info["username"], "password": info["password"]}),
        ) as r,
    ):
        token = (await r.json())["token"]
    headers = {
        "X-Violet-App-Id": str(app_id),
        "X-Violet-App-Secret": secret,
        "X-Violet-Token": token,
        "Content-Type": "application/json",
    }
    results: dict[str, Any] = {}
    bags = Bags()
    for concurrency in (1, 16, 64):
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with (
            VioletClient(app_id, secret, token=token, base_url=base, retry=RetryPolicy()) as sdk,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as raw,
            httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as hx,
        ):

            async def sdk_call(o: int, b: int) -> OrderRefund:
                return await sdk.refund_bag(o, b, amount_refunded=1)

            async def raw_call(o: int, b: int) -> Any:
                url = f"{base}/orders/{o}/bags/{b}/refunds"
                async with raw.post(url, data=body, headers=headers) as resp:
                    return orjson.loads(await resp.read())

            async def httpx_call(o: int, b: int) -> PydRefund:
                resp = await hx.post(f"/orders/{o}/bags/{b}/refunds", content=body)
                return PydRefund.model_validate_json(resp.content)

            clients = {"sdk": sdk_call, "raw": raw_call, "httpx": httpx_call}
            if os.environ.get("BENCH_NO_HTTPX"):
                clients.pop("httpx")
            for call in clients.values():  # warm up connections and code paths
                await run_round(call, bags, 200, concurrency)
            per_round: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
            for _ in range(rounds):
                for name, call in clients.items():
                    per_round[name].append(await run_round(call, bags, calls, concurrency))
        # Medians of short interleaved rounds: steadier than totals on a shared machine.
        row: dict[str, Any] = {
            name: {
                "calls_per_s": calls / statistics.median(w for w, _ in rounds_),
                "cpu_us_per_call": statistics.median(c for _, c in rounds_) / calls * 1e6,
            }
            for name, rounds_ in per_round.items()
        }
        row["ratio_sdk_raw"] = row["sdk"]["calls_per_s"] / row["raw"]["calls_per_s"]
        if "httpx" in row:
            row["ratio_sdk_httpx"] = row["sdk"]["calls_per_s"] / row["httpx"]["calls_per_s"]
        row["cpu_overhead_us"] = row["sdk"]["cpu_us_per_call"] - row["raw"]["cpu_us_per_call"]
        results[f"c{concurrency}"] = row
    return results


def micro() -> dict[str, float]:
    raw = orjson.dumps(
        {
            "id": 1,
            "order_id": 2,
            "bag_id": 3,
            "merchant_id": 4,
            "app_id": 5,
            "transaction_id": 6,
            "gateway_transaction_id": "g",
            "amount": 100,
            "merchant_transfer_reversal_amount_usd": 90,
            "developer_transfer_reversal_amount_usd": 10,
            "merchant_transfer_reversal_amount_platform_currency": 90,
            "developer_transfer_reversal_amount_platform_currency": 10,
            "reason": "r",
            "reason_code": "OTHER",
            "refund_currency": "USD",
            "platform_currency": "USD",
            "status": "COMPLETED",
            "skus": [
                {"id": 1, "refund_id": 1, "bag_id": 3, "order_sku_id": 9, "quantity_refunded": 1}
            ],
            "date_created": "2023-11-07T05:31:56Z",
            "date_last_modified": "2023-11-07T05:31:56Z",
            "external_id": "e",
            "errors": [],
            "shipping": None,
            "tax_amount": None,
        }
    )
    n = 20_000

    def per_call(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6

    retrier = Retrier(RetryPolicy(), SYSTEM_CLOCK, None)

    async def ok(_remaining: float | None) -> int:
        return 1

    async def wrapped() -> None:
        for _ in range(n):
            await retrier.run(ok, idempotent=False, method="POST", path="/p")

    async def bare() -> None:
        for _ in range(n):
            await ok(None)

    def timed(coro: Callable[[], Awaitable[None]]) -> float:
        start = time.perf_counter()
        asyncio.run(coro())
        return (time.perf_counter() - start) / n * 1e6

    return {
        "structure_sdk_us": per_call(lambda: converter.structure(orjson.loads(raw), OrderRefund)),
        "structure_pydantic_us": per_call(lambda: PydRefund.model_validate_json(raw)),
        "request_build_validate_serialize_us": per_call(
            lambda: encode_request(RefundBagRequest(amount_refunded=1000, reason="r"))
        ),
        "retry_wrapper_first_try_us": timed(wrapped) - timed(bare),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500, help="calls per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", default="benchmarks/results.json")
    args = parser.parse_args()
    proc, info = start_server()
    try:
        e2e = asyncio.run(end_to_end(info, args.calls, args.rounds))
    finally:
        proc.terminate()
        proc.wait()
    figures = micro()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"machine: {machine}")
    print(
        f"{'conc':>5} {'sdk/s':>9} {'raw/s':>9} {'httpx/s':>9} {'sdk/raw':>8} "
        f"{'sdk/httpx':>9} {'cpu sdk':>8} {'cpu raw':>8} {'cpu httpx':>9} {'overhead':>9}"
    )
    for key, row in e2e.items():
        print(
            f"{key[1:]:>5} {row['sdk']['calls_per_s']:>9.0f} {row['raw']['calls_per_s']:>9.0f} "
            f"{row['httpx']['calls_per_s']:>9.0f} {row['ratio_sdk_raw']:>7.2f}x "
            f"{row['ratio_sdk_httpx']:>8.2f}x {row['sdk']['cpu_us_per_call']:>7.0f}µ "
            f"{row['raw']['cpu_us_per_call']:>7.0f}µ {row['httpx']['cpu_us_per_call']:>8.0f}µ "
            f"{row['cpu_overhead_us']:>8.1f}µ"
        )
    for name, value in figures.items():
        print(f"{name:<40} {value:8.2f} µs")
    with open(args.json, "wb") as out:
        out.write(
            orjson.dumps(
                {"machine": machine, "end_to_end": e2e, "micro": figures},
                option=orjson.OPT_INDENT_2,
            )
        )


if __name__ == "__main__":
    main()
