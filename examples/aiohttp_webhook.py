"""Receive Violet's ORDER_REFUNDED / ORDER_CANCELLED webhooks in an aiohttp.web app.

The receiver checks the signature with your app secret before reading the body. Here an
embedded FakeViolet plays Violet: it signs and posts a webhook for the refund we make.

    python examples/aiohttp_webhook.py
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from violet_async.testing import FakeViolet
from violet_async.webhooks import WebhookEvent, WebhookReceiver, webhook_handler


async def main() -> None:
    received: asyncio.Queue[str] = asyncio.Queue()

    async def on_event(event: WebhookEvent) -> None:
        # Your work goes here; Violet gets its 200 once it returned.
        await received.put(f"webhook {event.event_id}: order {event.order_id}")

    async with FakeViolet(orders=3, seed=1) as fake:
        app = web.Application()
        handler = webhook_handler(WebhookReceiver(fake.app_secret), on_event)
        app.router.add_post("/violet/webhooks", handler.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        fake.register_webhook(f"http://127.0.0.1:{port}/violet/webhooks")
        try:
            async with fake.client() as client:
                order_id, bag_id = fake.seeded[0]
                await client.refund_bag(order_id, bag_id, amount_refunded=500)
            print(await asyncio.wait_for(received.get(), timeout=10))
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
