"""refund_bag throughput and client CPU: the SDK vs raw aiohttp + orjson (the limit) vs
a plain httpx + pydantic v2 client (what a user would otherwise write).

The server runs in its own process on 127.0.0.1: ``--server lean`` (the default) is a
bare aiohttp.web handler answering every refund POST with a Violet-shaped body (a refund
with three SKU lines, shipping, a resolved error and every documented field, its ids
those of the request), so the client is what is measured; each call is on its own bag.
``--server fake`` is FakeViolet (faults off), 2,000 bags round-robin. ``--baseline DIR``
adds the SDK imported from another checkout (``git worktree add DIR <commit>``) as a
fourth client in the same rounds: before / after in one run. ``--profile FILE`` writes
a cProfile of the SDK worker's rounds at concurrency 64.

Each client runs in its own process:
one worker process per client, so that no client's objects, timers or garbage weigh on
another's measurements. A coordinator runs short rounds in turn (SDK, raw, httpx, then
rotated), so machine drift cancels out, and reports medians. Ratios are the median of
each round against its neighbouring rounds of the other client. Prints calls/s, client
CPU microseconds per call (the worker's own process time) and the ratios, and writes
the same to JSON.

    pip install -e '.[bench]'
    python benchmarks/bench_refund.py [--calls 1000] [--rounds 25] [--json results.json]
    python benchmarks/bench_refund.py --baseline /work/wt/base --rounds 9 --profile sdk.prof
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from typing import Any

# A --baseline worker (spawned with BENCH_SDK_PATH) imports the SDK from that checkout.
if os.environ.get("BENCH_SDK_PATH"):
    sys.path.insert(0, os.environ["BENCH_SDK_PATH"])

import aiohttp
import httpx
import orjson
import pydantic

from violet_async import OrderRefund, RefundBagRequest, RetryPolicy, VioletClient
from violet_async._converter import encode_request
from violet_async._responses import parse_refund
from violet_async._retry import SYSTEM_CLOCK, Retrier
from violet_async._transport import RawResponse
from violet_async.testing import read_banner

ORDERS = 2000
FIRST_ORDER, FIRST_BAG = 100_001, 200_001  # FakeViolet's deterministic seeding


class PydSku(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")
    id: int | None = None
    refund_id: int | None = None
    bag_id: int | None = None
    quantity_refunded: int | None = None
    external_id: str | None = None
    order_sku_id: int | None = None


class PydError(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")
    id: int | None = None
    error_code: int | None = None
    error_message: str | None = None
    resolved: bool | None = None
    date_resolved: datetime | None = None
    date_created: datetime | None = None
    refund_id: int | None = None


class PydShipping(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")
    amount: int | None = None
    tax_amount: int | None = None
    full_refund: bool | None = None
    discrepancy_reason: str | None = None


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
    skus: list[PydSku] = []
    date_created: datetime | None = None
    date_last_modified: datetime | None = None
    external_id: str | None = None
    errors: list[PydError] = []
    shipping: PydShipping | None = None
    tax_amount: int | None = None


#: Violet's refund as its spec page documents it: every field, three SKU lines, a
#: resolved error and shipping; %(order)d / %(bag)d are the request's.
VIOLET_REFUND = (
    b'{"id": 4000%(bag)d, "order_id": %(order)d, "bag_id": %(bag)d, "merchant_id": 20001,'
    b' "app_id": 10001, "transaction_id": 7000%(bag)d,'
    b' "gateway_transaction_id": "re_3OJ8d2KZ0dZRqLEX1cV0abcd",'
    b' "amount": 1, "merchant_transfer_reversal_amount_usd": 1,'
    b' "developer_transfer_reversal_amount_usd": 0,'
    b' "merchant_transfer_reversal_amount_platform_currency": 1,'
    b' "developer_transfer_reversal_amount_platform_currency": 0,'
    b' "reason": "Customer requested refund.", "reason_code": "OTHER",'
    b' "refund_currency": "USD", "platform_currency": "USD", "status": "COMPLETED",'
    b' "skus": ['
    b'{"id": 1%(bag)d, "refund_id": 4000%(bag)d, "bag_id": %(bag)d, "quantity_refunded": 1,'
    b' "external_id": "gid://shopify/RefundLineItem/1", "order_sku_id": 300001},'
    b'{"id": 2%(bag)d, "refund_id": 4000%(bag)d, "bag_id": %(bag)d, "quantity_refunded": 2,'
    b' "external_id": "gid://shopify/RefundLineItem/2", "order_sku_id": 300002},'
    b'{"id": 3%(bag)d, "refund_id": 4000%(bag)d, "bag_id": %(bag)d, "quantity_refunded": 1,'
    b' "external_id": "gid://shopify/RefundLineItem/3", "order_sku_id": 300003}],'
    b' "date_created": "%(date)s", "date_last_modified": "%(date)s",'
    b' "external_id": "gid://shopify/Refund/998877",'
    b' "errors": [{"id": 9%(bag)d, "error_code": 2402, "error_message": "Retried once",'
    b' "resolved": true, "date_resolved": "2023-11-07T05:31:57Z",'
    b' "date_created": "2023-11-07T05:31:56Z", "refund_id": 4000%(bag)d}],'
    b' "shipping": {"amount": 0, "tax_amount": 0, "full_refund": false,'
    b' "discrepancy_reason": "none"},'
    b' "tax_amount": 0}'
)


_made_at: tuple[int, bytes] = (0, b"")


def made_at() -> bytes:
    """Now, as Violet writes a refund's date (formatted once a second)."""
    global _made_at  # noqa: PLW0603 - a one-entry cache
    second = int(time.time())
    if _made_at[0] != second:
        stamp = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        _made_at = (second, stamp.encode())
    return _made_at[1]


def lean_server() -> None:
    """A bare aiohttp.web handler on 127.0.0.1 (port 0), printing its port: what a
    server that costs nothing would answer."""
    from aiohttp import web

    async def refund(request: web.Request) -> web.Response:
        await request.read()
        ids = {
            b"order": int(request.match_info["o"]),
            b"bag": int(request.match_info["b"]),
            b"date": made_at(),  # dated when made, as Violet dates a refund
        }
        return web.Response(body=VIOLET_REFUND % ids, content_type="application/json")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", refund)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


def start_lean() -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and file
        [sys.executable, __file__, "--lean-server"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, {
        "base_url": f"http://127.0.0.1:{port}/v1",
        "app_id": "10001",
        "app_secret": "lean-secret",
        "token": "lean-token",
        "lean": "1",
    }


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
    return proc, read_banner(iter(proc.stdout.readline, ""))


class Bags:
    """Hands out (order, bag) pairs: round-robin over FakeViolet's seeded bags (each
    refund takes 1 cent), or a new bag every call on the lean server."""

    def __init__(self, *, fresh: bool = False, start: int = 0) -> None:
        self.i = start
        self.fresh = fresh

    def next(self) -> tuple[int, int]:
        self.i += 1
        k = self.i if self.fresh else self.i % ORDERS
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


def login(info: dict[str, str]) -> str:
    if "token" in info:
        return info["token"]

    async def go() -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                info["base_url"] + "/login",
                headers={
                    "X-Violet-App-Id": info["app_id"],
                    "X-Violet-App-Secret": info["app_secret"],
                },
                data=orjson.dumps({"username": info["username"], "password": info["password"]}),
            ) as r,
        ):
            token: str = (await r.json())["token"]
            return token

    return asyncio.run(go())


async def open_client(
    kind: str, info: dict[str, str], token: str
) -> tuple[Callable[[int, int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    """The call under test for ``kind`` and a coroutine that closes its client."""
    base, app_id, secret = info["base_url"], int(info["app_id"]), info["app_secret"]
    body = orjson.dumps({"amount_refunded": 1})
    headers = {
        "X-Violet-App-Id": str(app_id),
        "X-Violet-App-Secret": secret,
        "X-Violet-Token": token,
        "Content-Type": "application/json",
    }
    if kind in ("sdk", "base"):
        sdk = VioletClient(app_id, secret, token=token, base_url=base, retry=RetryPolicy())
        await sdk.__aenter__()

        async def sdk_call(o: int, b: int) -> OrderRefund:
            return await sdk.refund_bag(o, b, amount_refunded=1)

        return sdk_call, sdk.aclose
    if kind == "raw":
        raw = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))

        async def raw_call(o: int, b: int) -> Any:
            url = f"{base}/orders/{o}/bags/{b}/refunds"
            async with raw.post(url, data=body, headers=headers) as resp:
                return orjson.loads(await resp.read())

        return raw_call, raw.close
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    hx = httpx.AsyncClient(base_url=base, headers=headers, limits=limits)

    async def httpx_call(o: int, b: int) -> PydRefund:
        resp = await hx.post(f"/orders/{o}/bags/{b}/refunds", content=body)
        return PydRefund.model_validate_json(resp.content)

    return httpx_call, hx.aclose


def client_worker(  # noqa: PLR0917 - one call site
    kind: str,
    info: dict[str, str],
    token: str,
    concurrency: int,
    conn: Connection,
    profile: str | None = None,
) -> None:
    """One client in its own process: runs a round each time the coordinator asks."""
    import violet_async

    loop = asyncio.new_event_loop()
    call, close = loop.run_until_complete(open_client(kind, info, token))
    # Each client its own range of bags: no two calls of a run share one.
    bags = Bags(fresh="lean" in info, start=KINDS.index(kind) * 10_000_000)
    loop.run_until_complete(run_round(call, bags, 200, concurrency))  # warm up
    conn.send(("ready", violet_async.__file__))
    profiler = cProfile.Profile() if profile else None
    while (calls := conn.recv()) is not None:
        if profiler is not None:
            profiler.enable()
        conn.send(loop.run_until_complete(run_round(call, bags, calls, concurrency)))
        if profiler is not None:
            profiler.disable()
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    loop.run_until_complete(close())
    loop.close()
    conn.close()


KINDS = ("sdk", "raw", "httpx", "base")


def end_to_end(  # noqa: PLR0917 - one call site
    info: dict[str, str],
    kinds: list[str],
    calls: int,
    rounds: int,
    baseline: str | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    token = login(info)
    ctx = multiprocessing.get_context("spawn")
    # httpx + pydantic is an order of magnitude slower: shorter rounds keep the run short.
    round_calls = {kind: calls // 5 if kind == "httpx" else calls for kind in kinds}
    results: dict[str, Any] = {}
    for concurrency in (1, 16, 64):
        workers = {}
        for kind in kinds:
            parent, child = ctx.Pipe()
            profiled = profile if kind == "sdk" and concurrency == 64 else None
            proc = ctx.Process(
                target=client_worker, args=(kind, info, token, concurrency, child, profiled)
            )
            if kind == "base" and baseline:
                os.environ["BENCH_SDK_PATH"] = baseline  # the spawned process imports from it
            try:
                proc.start()
            finally:
                os.environ.pop("BENCH_SDK_PATH", None)
            workers[kind] = (proc, parent)
        for kind, (_, conn) in workers.items():
            ready, where = conn.recv()
            assert ready == "ready"
            results.setdefault("imports", {})[kind] = where
        # Per round: (calls/s, client CPU µs per call).
        per_round: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
        for index in range(rounds):
            # Rotate who goes first, so no client always follows the same neighbour.
            for kind in kinds[index % len(kinds) :] + kinds[: index % len(kinds)]:
                conn = workers[kind][1]
                conn.send(round_calls[kind])
                wall, cpu = conn.recv()
                per_round[kind].append((round_calls[kind] / wall, cpu / round_calls[kind] * 1e6))
        for proc, conn in workers.values():
            conn.send(None)
            proc.join()
        row: dict[str, Any] = {
            kind: {
                "calls_per_s": statistics.median(r for r, _ in rounds_),
                "cpu_us_per_call": statistics.median(c for _, c in rounds_),
            }
            for kind, rounds_ in per_round.items()
        }
        sdk = per_round["sdk"]
        for other in [k for k in kinds if k != "sdk"]:
            # Each SDK round against the same-numbered round of the other client.
            row[f"ratio_sdk_{other}"] = statistics.median(
                s[0] / o[0] for s, o in zip(sdk, per_round[other], strict=True)
            )
        row["cpu_overhead_us"] = statistics.median(
            s[1] - r[1] for s, r in zip(sdk, per_round["raw"], strict=True)
        )
        if "base" in per_round:
            base = per_round["base"]
            row["ratio_base_raw"] = statistics.median(
                b[0] / r[0] for b, r in zip(base, per_round["raw"], strict=True)
            )
            row["base_cpu_overhead_us"] = statistics.median(
                b[1] - r[1] for b, r in zip(base, per_round["raw"], strict=True)
            )
        row["rounds"] = per_round  # (calls/s, CPU µs per call) of every round, in order
        results[f"c{concurrency}"] = row
    return results


def micro() -> dict[str, float]:
    raw = VIOLET_REFUND % {b"order": 100001, b"bag": 200001, b"date": made_at()}
    response = RawResponse(200, {}, raw)
    n = 20_000

    def per_call(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6

    retrier = Retrier(RetryPolicy(), SYSTEM_CLOCK, None)

    async def ok(_remaining: float | None) -> int:
        return 1

    async def wrapped() -> None:
        for _ in range(n):
            await retrier.run(ok, method="POST", path="/p")

    async def bare() -> None:
        for _ in range(n):
            await ok(None)

    def timed(coro: Callable[[], Awaitable[None]]) -> float:
        start = time.perf_counter()
        asyncio.run(coro())
        return (time.perf_counter() - start) / n * 1e6

    return {
        # What the client runs on a response's bytes: decode, check, build the model.
        "structure_sdk_us": per_call(lambda: parse_refund(response, "/p")),
        "structure_pydantic_us": per_call(lambda: PydRefund.model_validate_json(raw)),
        "request_build_validate_serialize_us": per_call(
            lambda: encode_request(RefundBagRequest(amount_refunded=1000, reason="r"))
        ),
        "retry_wrapper_first_try_us": timed(wrapped) - timed(bare),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000, help="calls per round (httpx: 1/5)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--skip-httpx", action="store_true", help="SDK and raw aiohttp only")
    parser.add_argument("--json", default="benchmarks/results.json")
    parser.add_argument("--server", choices=("lean", "fake"), default="lean")
    parser.add_argument("--baseline", help="a checkout whose SDK runs as a fourth client")
    parser.add_argument("--profile", help="cProfile of the SDK worker at concurrency 64")
    parser.add_argument("--lean-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lean_server:
        lean_server()
        return
    kinds = ["sdk", "raw"] if args.skip_httpx else ["sdk", "raw", "httpx"]
    if args.baseline:
        kinds.append("base")
    proc, info = start_lean() if args.server == "lean" else start_server()
    try:
        e2e = end_to_end(info, kinds, args.calls, args.rounds, args.baseline, args.profile)
    finally:
        proc.terminate()
        proc.wait()
    imports = e2e.pop("imports")
    for kind, where in imports.items():
        print(f"{kind}: violet_async from {where}")
    figures = micro()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )
    print(f"machine: {machine}; server: {args.server}")
    columns = ["conc", "sdk/s", "raw/s", "sdk/raw", "cpu sdk", "cpu raw", "overhead"]
    if "httpx" in kinds:
        columns[3:3] = ["httpx/s"]
        columns[5:5] = ["sdk/httpx"]
        columns.append("cpu httpx")
    if "base" in kinds:
        columns += ["base/raw", "base ovh"]
    print(" ".join(f"{c:>9}" for c in columns))
    for key, row in e2e.items():
        cells = {
            "conc": key[1:],
            "sdk/s": f"{row['sdk']['calls_per_s']:.0f}",
            "raw/s": f"{row['raw']['calls_per_s']:.0f}",
            "sdk/raw": f"{row['ratio_sdk_raw']:.2f}x",
            "cpu sdk": f"{row['sdk']['cpu_us_per_call']:.0f}µs",
            "cpu raw": f"{row['raw']['cpu_us_per_call']:.0f}µs",
            "overhead": f"{row['cpu_overhead_us']:.1f}µs",
        }
        if "httpx" in row:
            cells["httpx/s"] = f"{row['httpx']['calls_per_s']:.0f}"
            cells["sdk/httpx"] = f"{row['ratio_sdk_httpx']:.2f}x"
            cells["cpu httpx"] = f"{row['httpx']['cpu_us_per_call']:.0f}µs"
        if "base" in row:
            cells["base/raw"] = f"{row['ratio_base_raw']:.2f}x"
            cells["base ovh"] = f"{row['base_cpu_overhead_us']:.1f}µs"
        print(" ".join(f"{cells[c]:>9}" for c in columns))
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
