"""Violet webhooks under any framework (FastAPI, Starlette, Django, aiohttp): verify and
claim with ``receiver.receive``, then ``done`` after your callback succeeded or
``release`` so Violet's next delivery runs it again. The callback is idempotent, since
delivery is at least once. Here plain aiohttp.web hosts it and an embedded FakeViolet
plays Violet.

    python examples/webhook_any_framework.py
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from violet_async.testing import FakeViolet
from violet_async.webhooks import (
    WebhookBusyError,
    WebhookEvent,
    WebhookPayloadError,
    WebhookReceiver,
    WebhookSignatureError,
    WebhookTooLargeError,
)

db = sqlite3.connect(":memory:")
db.execute("CREATE TABLE bag_state (bag_id INTEGER PRIMARY KEY, status TEXT)")


async def on_event(event: WebhookEvent) -> None:
    for bag in event.order.bags:
        # an upsert: running it twice leaves the same row
        db.execute(
            "INSERT INTO bag_state (bag_id, status) VALUES (?, ?)"
            " ON CONFLICT (bag_id) DO UPDATE SET status = excluded.status",
            (bag.id, str(bag.status)),
        )


async def violet_webhook(
    receiver: WebhookReceiver, headers: Mapping[str, str], body: bytes
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) to answer; call it from your framework's route."""
    try:
        event = await receiver.receive(headers, body)
    except WebhookSignatureError:
        return 401, {"error": "bad signature"}
    except WebhookTooLargeError:
        return 413, {"error": "too large"}
    except WebhookPayloadError:
        return 400, {"error": "bad payload"}
    except WebhookBusyError:
        return 503, {"error": "in progress"}
    if event.duplicate:
        return 200, {"duplicate": True}
    try:
        await asyncio.wait_for(on_event(event), 8)
    except Exception:  # noqa: BLE001 - any failure: let Violet deliver it again
        await receiver.release(event)  # Violet delivers again
        return 503, {"error": "not handled"}
    await receiver.done(event)
    return 200, {"received": event.event_id}


async def main() -> None:
    async with FakeViolet(orders=3, seed=1) as fake:
        receiver = WebhookReceiver(fake.app_secret)

        async def route(request: web.Request) -> web.Response:
            # Bound the body in your server too (aiohttp: client_max_size, 1 MiB).
            status, answer = await violet_webhook(receiver, request.headers, await request.read())
            return web.json_response(answer, status=status)

        app = web.Application()
        app.router.add_post("/violet/webhooks", route)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.register_webhook(f"http://127.0.0.1:{runner.addresses[0][1]}/violet/webhooks")
        try:
            async with fake.client() as client:
                order_id, bag_id = fake.seeded[0]
                await client.refund_bag(order_id, bag_id, amount_refunded=500)
            await fake.drain_webhooks()
        finally:
            await runner.cleanup()
    for bag_id, status in db.execute("SELECT bag_id, status FROM bag_state"):
        print(f"bag {bag_id}: {status}")


if __name__ == "__main__":
    asyncio.run(main())
