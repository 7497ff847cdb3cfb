"""Calling from a web app: an aiohttp handler refunds a bag under an idempotency key
built from your own refund request's id, so a double click, a retried request or a
handler cut off by its timeout never refunds twice.

Run as is, it starts an embedded FakeViolet; with VIOLET_* variables set it talks to
Violet or to `violet-async fake-server`. It serves the app on 127.0.0.1, then clicks
"Refund" three times at once and once more later.

    python examples/web_app_refund.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    IdempotencyKeyReusedError,
    VioletClient,
)
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeViolet

# Your own records: refund request 7 asks for 500 cents back on order 100001, bag 200001.
REFUND_REQUESTS = {7: {"order_id": 100001, "bag_id": 200001, "amount": 500}}
VIOLET = web.AppKey("violet", VioletClient)


async def refund(request: web.Request) -> web.Response:
    """POST /refund-requests/{id}/refund: refund it at Violet, at most once."""
    request_id = int(request.match_info["id"])
    wanted = REFUND_REQUESTS[request_id]
    client = request.app[VIOLET]
    try:
        # Your own request timeout: a cut-off call is recorded as sent-and-unknown
        # before it stops, and the next click with the same key resumes it.
        # The key is your refund request's id: every click, retry or worker process
        # handling this request asks for the same refund, gets the same one.
        done = await asyncio.wait_for(
            client.refund_bag(
                wanted["order_id"],
                wanted["bag_id"],
                amount_refunded=wanted["amount"],
                idempotency_key=f"refund-request-{request_id}",
            ),
            25,
        )
    except (AmbiguousOutcomeError, BagPendingError, asyncio.TimeoutError):
        # Sent, but not confirmed yet (Violet or your timeout cut it short, or an
        # earlier click is still being settled). Say so, never "failed": the shopper
        # may already have it. Clicking again (same key) checks again, never twice.
        pending = {"state": "pending", "message": "Refund requested; being confirmed"}
        return web.json_response(pending, status=202)
    except IdempotencyKeyReusedError:
        # This refund request was already used for a different refund: a bug to fix.
        return web.json_response({"state": "conflict"}, status=409)
    return web.json_response({"state": "refunded", "refund_id": done.id, "amount": done.amount})


def make_app(client: VioletClient) -> web.Application:
    app = web.Application()
    app[VIOLET] = client
    app.router.add_post("/refund-requests/{id}/refund", refund)
    return app


@contextlib.asynccontextmanager
async def violet(store: SQLiteStore) -> AsyncIterator[VioletClient]:
    """A client from VIOLET_* variables, or on an embedded FakeViolet when none are set.
    The store is one SQLite file for every worker process of the web app."""
    if os.environ.get("VIOLET_APP_ID"):
        async with VioletClient.from_env(store=store) as client:
            yield client
    else:
        async with FakeViolet(orders=10, seed=1) as fake, fake.client(store=store) as client:
            yield client


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteStore(Path(tmp) / "refunds.db") as store, violet(store) as client:
            runner = web.AppRunner(make_app(client))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            url = f"http://127.0.0.1:{port}/refund-requests/7/refund"
            try:
                async with aiohttp.ClientSession() as browser:

                    async def click() -> dict[str, object]:
                        async with browser.post(url) as response:
                            return dict(await response.json())

                    clicks = await asyncio.gather(click(), click(), click())  # a triple click
                    later = await click()  # and the shopper's reload a minute later
            finally:
                await runner.cleanup()
    ids = {answer["refund_id"] for answer in [*clicks, later]}
    print(f"4 clicks, {len(ids)} refund: {later}")


if __name__ == "__main__":
    asyncio.run(main())
